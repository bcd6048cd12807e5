"""bench/lib: the one percentile, growth slopes, the JSON layout, the checkpoint writers, process probes, the version
a response names; every benchmark script answers --help."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.lib.checkpoints import make_checkpoints
from bench.lib.models import MARKER_STEP, big_mlp, shape_for, version_of
from bench.lib.resources import count_paths, parse_maps_device_bytes, parse_status, process_sample
from bench.lib.stats import growth_pct, median, percentile, slope
from bench.lib.swapload import utf8_response_version, within
from bench.lib.triton_repo import make_repository
from bench.record import dumps
from serving.triton.version_output import encode_utf8

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if "def main(" in p.read_text())


def test_percentile_interpolates_between_the_nearest_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(statistics.quantiles(values, n=100, method="inclusive")[q - 1])
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([30.0, 150.0], 50) == 90.0 and percentile([2.5], 99) == 2.5
    assert percentile([], 50) is None and median([]) is None and median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile(values, 101)


def test_dumps_keeps_lists_of_values_on_one_line() -> None:
    doc = {"timeline": {"start_s": [0.0, 0.5], "latency_ms": [1.5, 2.0]}, "runs": [{"a": 1}], "empty": [],
           "path": Path("/x")}
    text = dumps(doc)
    assert '"start_s": [0.0, 0.5],' in text and '"runs": [\n    {\n      "a": 1' in text
    assert json.loads(text) == {**doc, "path": "/x"}


def test_checkpoint_versions_are_sharded_directories_whose_marker_names_the_version(tmp_path: Path) -> None:
    width, layers = shape_for(0.0005, torch.float16, 1024)
    ckpts = make_checkpoints(tmp_path, width, layers, torch.float16, "cpu")
    path, _ = ckpts.publish(3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["marker"] == "marker.safetensors" and len(index["weight_map"]) == layers + 1
    state = {**load_file(path / "layers.safetensors"), **load_file(path / "marker.safetensors")}
    module = big_mlp(width, layers, "cpu", "float16")
    module.load_state_dict(state)
    assert (path / "layers.safetensors").stat().st_ino == (tmp_path / "layers.safetensors").stat().st_ino
    with torch.inference_mode():
        assert version_of(module(torch.zeros(1, width, dtype=torch.float16))) == 3
    assert state["marker"][0].item() == 3 * MARKER_STEP


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help(script: str) -> None:
    out = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_growth_is_the_least_squares_slope_in_percent_of_the_level() -> None:
    swaps = [200, 300, 400, 500]
    assert slope(swaps, [10.0, 11.0, 12.0, 13.0]) == pytest.approx(0.01)
    assert growth_pct(swaps, [10.0, 11.0, 12.0, 13.0], per=100) == pytest.approx(100 * 1.0 / 11.5)
    assert growth_pct(swaps, [50.0, 50.0, 50.0, 50.0], per=100) == 0.0
    assert growth_pct(swaps, [0.0] * 4, per=100) == 0.0  # nothing left behind, ever
    assert growth_pct(swaps, [52.0, 48.0, 52.0, 48.0], per=100) == pytest.approx(-1.6)  # noise, no trend
    assert growth_pct([200], [1.0], per=100) is None and slope([5, 5], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        slope([1, 2, 3], [1.0, 2.0])


def test_proc_status_and_maps_parse_into_bytes_and_counts() -> None:
    status = "Name:\ttriton_python_b\nVmLck:\t       4 kB\nVmPin:\t       0 kB\nVmRSS:\t  327784 kB\nThreads:\t11\n" \
             "Cpus_allowed_list:\t0-1\n"
    assert parse_status(status) == {"VmLck": 4096, "VmPin": 0, "VmRSS": 327784 * 1024, "Threads": 11}
    maps = ("7f0000000000-7f0000200000 rw-s 00000000 00:05 12 /dev/nvidiactl\n"
            "7f0000200000-7f0000201000 rw-p 00000000 00:00 0 \n"
            "7f1000000000-7f1000100000 rw-s 00000000 00:05 13 /dev/nvidia0\n"
            "55d000000000-55d000001000 r--p 00000000 08:01 99 /usr/bin/tritonserver\n")
    assert parse_maps_device_bytes(maps, "/dev/nvidia") == 0x200000 + 0x100000


def test_a_live_process_is_sampled_and_files_are_counted_at_any_depth(tmp_path: Path) -> None:
    me = process_sample(os.getpid(), gpu=False)
    assert me["rss_bytes"] and me["rss_bytes"] > 1 << 20 and me["threads"] and me["fds"] and me["fds"] >= 3
    assert process_sample(2**22 + 12345, gpu=False)["rss_bytes"] is None  # no such process
    (tmp_path / "hotswap-aoti-x" / "sub").mkdir(parents=True)
    (tmp_path / "hotswap-aoti-x" / "sub" / "f").write_text("x")
    (tmp_path / "other").write_text("x")
    assert count_paths(tmp_path) == 4 and count_paths(tmp_path, lambda n: n.startswith("hotswap-")) == 3
    assert count_paths(tmp_path / "missing") == 0


def test_the_time_windows_of_swaps_are_found_by_bisection() -> None:
    inside = within([(5.0, 6.0), (1.0, 2.0), (1.5, 3.0)])
    assert [inside(t) for t in (0.5, 1.0, 2.5, 3.0, 3.5, 5.5, 6.0, 7.0)] == [False, True, True, True, False, True,
                                                                           True, False]
    assert not within([])(1.0)


class _Result:
    """Stands in for a tritonclient result: ``as_numpy`` by output name (None when the output is absent)."""

    def __init__(self, **outputs: np.ndarray) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


def test_the_version_a_response_names_comes_from_its_utf8_output_and_agrees_with_the_string() -> None:
    def rows(*versions: str) -> np.ndarray:
        return np.stack([np.frombuffer(encode_utf8(v, 64)[0], dtype=np.uint8) for v in versions])

    assert utf8_response_version(_Result(HOTSWAP_WEIGHTS_VERSION_UTF8=rows("v1+a2", "v1+a2"))) == "v1+a2"
    both = _Result(HOTSWAP_WEIGHTS_VERSION_UTF8=rows("v1"), HOTSWAP_WEIGHTS_VERSION=np.array([[b"v1"]], dtype=object))
    assert utf8_response_version(both) == "v1"
    torn = _Result(HOTSWAP_WEIGHTS_VERSION_UTF8=rows("v1"), HOTSWAP_WEIGHTS_VERSION=np.array([[b"v2"]], dtype=object))
    assert utf8_response_version(torn) == "['v1', 'v2']"
    assert utf8_response_version(_Result(HOTSWAP_WEIGHTS_VERSION_UTF8=rows("v1", "v2"))) == "['v1', 'v2']"
    with pytest.raises(ValueError, match="no HOTSWAP_WEIGHTS_VERSION_UTF8 output"):
        utf8_response_version(_Result(HOTSWAP_WEIGHTS_VERSION=np.array([[b"v1"]], dtype=object)))


def test_a_repository_can_declare_the_utf8_version_output(tmp_path: Path) -> None:
    [name] = make_repository(tmp_path, 64, 1, ["double_buffer"], "KIND_CPU", version_output=False, version_utf8=True)
    config = (tmp_path / name / "config.pbtxt").read_text()
    assert '"HOTSWAP_WEIGHTS_VERSION_UTF8", data_type: TYPE_UINT8, dims: [ 64 ]' in config
    assert '"HOTSWAP_WEIGHTS_VERSION"' not in config
