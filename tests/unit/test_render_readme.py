"""bench/render_readme.py: the README's generated blocks are what their generators make from bench/results/,
markers are checked, every result file is shown with its command, and the GPU sections read what the GPU
benchmarks write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import render_readme as rr  # noqa: E402

TEXT = """# title
intro
<!-- BEGIN generated:a -->
old a
<!-- END generated:a -->
middle
<!-- BEGIN generated:b -->
<!-- END generated:b -->
end
"""


def test_readme_is_what_the_generators_make_from_the_results() -> None:
    text = rr.README.read_text()
    assert "measured" in rr.block_names(text)
    assert rr.stale_blocks(text, rr.GENERATORS) == [], "README.md is out of date: run python -m bench.render_readme"


def test_every_result_file_has_its_command_and_appears_in_the_readme() -> None:
    body = rr.read_block(rr.README.read_text(), "measured")
    for path in sorted(rr.RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc.get("command"), f"{path.name}: no 'command'"
        assert f"(bench/results/{path.name})" in body and f"`{doc['command']}`" in body, path.name


def test_replace_block_changes_only_that_block() -> None:
    assert rr.block_names(TEXT) == ["a", "b"]
    out = rr.replace_block(TEXT, "a", "new a\nsecond line")
    assert rr.read_block(out, "a") == "new a\nsecond line\n"
    assert out.replace("new a\nsecond line\n", "old a\n") == TEXT
    out = rr.replace_block(out, "b", "b body\n")
    assert rr.read_block(out, "b") == "b body\n" and rr.read_block(out, "a") == "new a\nsecond line\n"
    assert rr.render(TEXT, {"a": lambda: "x", "b": lambda: "y"}) == TEXT.replace("old a", "x").replace(
        "<!-- END generated:b -->", "y\n<!-- END generated:b -->")
    assert rr.stale_blocks(TEXT, {"a": lambda: "old a\n", "b": lambda: ""}) == []
    assert rr.stale_blocks(TEXT, {"a": lambda: "old a\n", "b": lambda: "y"}) == ["b"]


@pytest.mark.parametrize(("text", "says"), [
    ("<!-- BEGIN generated:a -->\n", "no END"),
    ("<!-- END generated:a -->\n", "without its BEGIN"),
    ("<!-- BEGIN generated:a -->\n<!-- BEGIN generated:b -->\n", "inside block"),
    (TEXT + TEXT, "appears twice"),
])
def test_unpaired_markers_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        rr.block_names(text)


def test_blocks_and_generators_must_match() -> None:
    with pytest.raises(ValueError, match="'b' has no generator"):
        rr.render(TEXT, {"a": lambda: "x"})
    with pytest.raises(ValueError, match="'c' has no block"):
        rr.render(TEXT, {"a": lambda: "x", "b": lambda: "y", "c": lambda: "z"})
    with pytest.raises(ValueError, match="no generated block 'c'"):
        rr.replace_block(TEXT, "c", "x")


def test_check_command_fails_on_a_stale_readme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(rr.README.read_text().replace("| eager |", "| eager (edited) |", 1))
    assert rr.main(["--check", "--readme", str(readme)]) == 1
    assert "measured" in capsys.readouterr().err
    assert rr.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == rr.README.read_text()
    assert rr.main(["--check", "--readme", str(readme)]) == 0


def test_a_result_file_no_section_shows_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mystery.json").write_text(json.dumps({"command": "python bench/x.py"}))
    with pytest.raises(ValueError, match="mystery.json: no README section shows"):
        rr.measured(tmp_path)


def test_a_result_without_its_command_is_an_error(tmp_path: Path) -> None:
    doc = json.loads((rr.RESULTS / "serve-swap-cpu2.json").read_text())
    del doc["command"]
    (tmp_path / "serve-swap-x.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="needs its 'command'"):
        rr.measured(tmp_path)


def test_gpu_refit_section_reads_what_bench_gpu_refit_writes(tmp_path: Path) -> None:
    """A dry run of the GPU benchmark on the CPU (figures meaningless, format real)."""
    out = tmp_path / "gpu-refit-dry.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_refit", "--device", "cpu", "--sizes", "0.004", "--engines",
                    "eager", "--strategies", "double_buffer", "--baseline-gb", "0.004", "--repeats", "2",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300,
                   env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    doc = json.loads(out.read_text())
    assert doc["command"] == "python3 -m bench.gpu_refit " + " ".join(
        a.replace(str(tmp_path), "$OUT") for a in doc["argv"]) and "$OUT/gpu-refit-dry.json" in doc["command"]
    text = rr.gpu_refit(tmp_path)
    run = doc["runs"][0]
    assert f"| eager | double_buffer | pinned | {run['bytes'] / 1e9:.2f} GB | float16 | " \
        f"{rr.secs(run['total_s_median'])} |" in text
    assert "through the host path" in text and f"`{doc['command']}`" in text


def test_gpu_publish_section_reads_the_headline_fields(tmp_path: Path) -> None:
    """bench/gpu_publish.py needs CUDA; the document below has the fields its summarize() writes."""
    hot = {"publish_to_first_response_s": {"median": 0.61, "max": 0.9, "all": [0.61]}, "stream_gbps": 27.5,
           "errors": 0, "torn": 0, "p99_during_over_steady": 1.4, "peak_memory_over_model": 2.01,
           "stages_ms_median": {"hash": 11.0, "transfer": 39.0, "swap": 0.0, "total": 60.0},
           "latency_by_phase_ms": {"steady": {"requests": 900, "p50": 3.0, "p99": 4.8, "max": 7.0},
                                   "transfer": {"requests": 100, "p50": 7.4, "p99": 20.1, "max": 21.8}}}
    doc = {"command": "python3 -m bench.gpu_publish --json $OUT/gpu-publish-x.json", "environment": {"gpu": "G"},
           "sizes": [{"size_gb": 1.0, "model_bytes": 1_006_649_344, "pinned_limit_gbps": 55.4,
                      "hotswap": {"double_buffer": hot, "server_ready_s": 9.0},
                      "baseline": {"publish_to_first_response_s": 4.2, "errors": 0, "torn": 0,
                                   "p99_during_over_steady": 1.5}},
                     {"size_gb": 16.0, "model_bytes": 16e9}],
           "errors": [{"size_gb": 16.0, "error": "RuntimeError: out of memory\nmore", "traceback": "..."}]}
    (tmp_path / "gpu-publish-x.json").write_text(json.dumps(doc))
    text = rr.gpu_publish(tmp_path)
    assert ("| 1.01 GB | double_buffer | 610 ms | 27.5 GB/s | 55.4 GB/s | hash 11, transfer 39 | 0 | 0 | 1.4x "
            "| 3.0 / 4.8 ms, 7.4 / 20.1 ms | 2.01x | 4.2 s | 0 / 0 | 1.5x "
            "| G |") in text
    # several models on one GPU: the GPU-wide memory peak is no one model's
    doc["sizes"][0]["hotswap"]["double_buffer, t8"] = hot
    (tmp_path / "gpu-publish-x.json").write_text(json.dumps(doc))
    assert "| 1.4x | 3.0 / 4.8 ms, 7.4 / 20.1 ms | n/a (2 models loaded) |" in rr.gpu_publish(tmp_path)
    assert "16.0 GB: did not complete: `RuntimeError: out of memory`" in text
