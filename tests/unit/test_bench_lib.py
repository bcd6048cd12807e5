"""bench/lib: the one percentile, the JSON layout, the checkpoint writers; every benchmark script answers --help."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.lib.checkpoints import make_checkpoints
from bench.lib.models import MARKER_STEP, big_mlp, shape_for, version_of
from bench.lib.stats import median, percentile
from bench.record import dumps

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
