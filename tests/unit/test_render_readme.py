"""bench/render_readme.py: the generated blocks of the README and docs/benchmarks.md and the pictures in
docs/figures/ are what their generators make from bench/results/, markers are checked, every result file is
shown with its command, the GPU sections read what the GPU benchmarks write, and the pictures are drawn
the same way every time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import render_readme as rr  # noqa: E402
from bench.render import figures, glance, tables  # noqa: E402

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


@pytest.mark.parametrize("doc", list(rr.DOCUMENTS), ids=lambda p: p.name)
def test_documents_are_what_the_generators_make_from_the_results(doc: Path) -> None:
    text = doc.read_text()
    assert rr.block_names(text) == list(rr.DOCUMENTS[doc])
    assert rr.stale_blocks(text, rr.DOCUMENTS[doc]) == [], \
        f"{doc.name} is out of date: run python -m bench.render_readme"


def pinned_matplotlib() -> str:
    """The matplotlib that draws docs/figures/, as pyproject.toml pins it for Python 3.11+."""
    found = re.search(r'"matplotlib==([^;"]+); python_version >= \'3\.11\'"', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml pins no matplotlib for Python 3.11+"
    return found[1]


def test_pictures_are_what_the_renderer_draws_from_the_results() -> None:
    drawn = figures.pictures(rr.RESULTS)
    assert {"publish-by-size", "timeline-serve-swap-timeline-cpu2", "loaders-gpu-refit-transfer-h200"} <= {
        p.name for p in drawn}
    shown = rr.BENCHMARKS.read_text()
    for p in drawn:
        assert f"(figures/{p.name}.svg)" in shown
        for src in p.sources:
            assert f"(../bench/results/{src.name})" in shown and f"`{json.loads(src.read_text())['command']}`" in shown
    import matplotlib

    if matplotlib.__version__ != pinned_matplotlib():  # another matplotlib draws other bytes
        pytest.skip(f"docs/figures/ are drawn by matplotlib {pinned_matplotlib()} (pyproject.toml, Python 3.11+); "
                    f"this is {matplotlib.__version__}, so the byte-for-byte comparison cannot hold here")
    assert rr.stale_pictures(drawn) == [], "docs/figures is out of date: run python -m bench.render_readme"


def test_every_result_file_has_its_command_and_appears_in_the_benchmarks() -> None:
    body = rr.read_block(rr.BENCHMARKS.read_text(), "measured")
    for path in sorted(rr.RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc.get("command"), f"{path.name}: no 'command'"
        assert f"(../bench/results/{path.name})" in body and f"`{doc['command']}`" in body, path.name


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


def test_the_check_names_a_stale_block_and_a_stale_picture_and_a_rewrite_mends_both(tmp_path: Path) -> None:
    docs = {tmp_path / "benchmarks.md": rr.DOCUMENTS[rr.BENCHMARKS]}
    (tmp_path / "benchmarks.md").write_text(rr.BENCHMARKS.read_text().replace("| eager |", "| eager (edited) |", 1))
    folder = tmp_path / "figures"
    folder.mkdir()
    drawn = [p for p in figures.pictures(rr.RESULTS) if p.name == "loaders-gpu-refit-transfer-h200"]
    (folder / f"{drawn[0].name}.svg").write_bytes(drawn[0].svg().replace(b"GB/s", b"MB/s", 1))
    (folder / "gone.svg").write_text("<svg/>")
    assert rr.run(docs, folder, drawn, check=True) == [
        "benchmarks.md: measured", f"figures: {drawn[0].name}.svg, gone.svg"]
    assert rr.run(docs, folder, drawn, check=False) != []
    assert (tmp_path / "benchmarks.md").read_text() == rr.BENCHMARKS.read_text()
    assert sorted(f.name for f in folder.iterdir()) == [f"{drawn[0].name}.svg"]
    assert rr.run(docs, folder, drawn, check=True) == []


def test_a_result_file_no_section_shows_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mystery.json").write_text(json.dumps({"command": "python bench/x.py"}))
    with pytest.raises(ValueError, match="mystery.json: no section of docs/benchmarks.md shows"):
        tables.measured(tmp_path)


def test_a_result_without_its_command_is_an_error(tmp_path: Path) -> None:
    doc = json.loads((rr.RESULTS / "serve-swap-cpu2.json").read_text())
    del doc["command"]
    (tmp_path / "serve-swap-x.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="needs its 'command'"):
        tables.measured(tmp_path)


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
    text = tables.gpu_refit(tmp_path)
    run = doc["runs"][0]
    assert f"| eager | double_buffer | pinned | {run['bytes'] / 1e9:.2f} GB | float16 | " \
        f"{tables.secs(run['total_s_median'])} |" in text
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
    text = tables.gpu_publish(tmp_path)
    assert ("| 1.01 GB | double_buffer | 610 ms | 27.5 GB/s | 55.4 GB/s | hash 11, transfer 39 | 0 | 0 | 1.4x "
            "| 3.0 / 4.8 ms, 7.4 / 20.1 ms | 2.01x | 4.2 s | 0 / 0 | 1.5x "
            "| G |") in text
    # several models on one GPU: the GPU-wide memory peak is no one model's
    doc["sizes"][0]["hotswap"]["double_buffer, t8"] = hot
    (tmp_path / "gpu-publish-x.json").write_text(json.dumps(doc))
    assert "| 1.4x | 3.0 / 4.8 ms, 7.4 / 20.1 ms | n/a (2 models loaded) |" in tables.gpu_publish(tmp_path)
    assert "16.0 GB: did not complete: `RuntimeError: out of memory`" in text


LOADERS = {"command": "python3 -m bench.loaders --json $OUT/loaders-x.json", "environment": {"gpu": "G", "cpus": 16},
           "rows": [{"name": "pinned", "threads": 8, "task_bytes": 16 << 20, "gbps": 25.9, "cpu_s_per_gb": 0.31,
                     "p99_during_ms": 51.6, "p99_steady_ms": 41.5},
                    {"name": "kvikio", "threads": 16, "task_bytes": 4 << 20, "gbps": 38.2, "cpu_s_per_gb": 0.05,
                     "p99_during_ms": 44.0, "p99_steady_ms": 41.0}]}


def test_a_loaders_result_gets_its_table_and_its_picture(tmp_path: Path) -> None:
    """bench/loaders.py writes one row per loader; its table and picture read that shape."""
    (tmp_path / "loaders-x.json").write_text(json.dumps(LOADERS))
    text = tables.measured(tmp_path)
    assert "| `kvikio` | 16 | 4 MiB | 38.2 GB/s | 0.05 s | 41 ms | 44 ms | G, 16 CPUs |" in text
    assert "`python3 -m bench.loaders --json $OUT/loaders-x.json`" in text
    [picture] = figures.pictures(tmp_path)
    svg = picture.svg()
    assert picture.name == "loaders-x" and svg.startswith(b"<?xml") and svg == picture.svg()
    assert "(../bench/results/loaders-x.json)" in picture.markdown("../", "figures")
    del LOADERS["rows"][1]["gbps"]
    (tmp_path / "loaders-x.json").write_text(json.dumps(LOADERS))
    with pytest.raises(ValueError, match=r"loaders-x.json: row 1 \(kvikio\) has no gbps"):
        tables.measured(tmp_path)


def test_a_gpu_publish_timeline_gets_its_picture(tmp_path: Path) -> None:
    hot = {"requests": 4, "errors": 0, "torn": 0, "publish_to_first_response_s": {"median": 0.5},
           "timeline": {"requests": {"start_s": [0.0, 0.5, 1.0, 1.5], "latency_ms": [3.0, 9.0, 30.0, 3.0]},
                        "swaps": [[0.9, 1.4]]}}
    doc = {"command": "python3 -m bench.gpu_publish --json $OUT/gpu-publish-t.json", "environment": {"gpu": "G"},
           "sizes": [{"size_gb": 16.0, "model_bytes": 16e9, "hotswap": {"double_buffer": hot}}], "errors": []}
    (tmp_path / "gpu-publish-t.json").write_text(json.dumps(doc))
    [picture] = figures.pictures(tmp_path)
    assert picture.name == "timeline-gpu-publish-t-16gb-double_buffer" and picture.svg() == picture.svg()
    assert figures.binned([0.0, 0.5, 1.0, 1.5], [3.0, 9.0, 30.0, 3.0], 2) == ([0.375, 1.125], [9.0, 30.0],
                                                                                [9.0, 30.0])


def test_pictures_carry_no_date() -> None:
    svg = figures.pictures(rr.RESULTS)[0].svg()
    assert b"<dc:date>" not in svg and b"Matplotlib v" not in svg


def test_the_headlines_name_their_files_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    text = rr.read_block(rr.README.read_text(), "glance")
    for name in (glance.GPU_PUBLISH, glance.CPU_PUBLISH, glance.CPU_REFIT, glance.GPU_STARTUP):
        assert f"(bench/results/{name})" in text
    assert "(docs/figures/publish-by-size.svg)" in text
    with pytest.raises(ValueError, match=f"{glance.GPU_PUBLISH}: the README's 'At a glance' quotes this result"):
        glance.glance(tmp_path)


def test_an_instances_result_gets_its_table(tmp_path: Path) -> None:
    """bench/gpu_instances.py: per instance count, every instance live and the bytes read against the model."""
    count = {"instances": 2, "swaps": [{"all_live_s": 1.5}], "all_live_s": {"median": 1.5, "max": 1.75},
             "read_until_live_over_model": 2.0, "read_until_hashed_over_model": 4.0}
    doc = {"command": "python3 -m bench.gpu_instances --json $OUT/gpu-instances-x.json", "environment": {"gpu": "G"},
           "model_bytes": 16e9, "counts": [count], "errors": []}
    (tmp_path / "gpu-instances-x.json").write_text(json.dumps(doc))
    text = tables.measured(tmp_path)
    assert "| 2 | 16.0 GB | 1.5 s | 1.75 s | 1 | 2x | 4x | G |" in text
    assert "`python3 -m bench.gpu_instances --json $OUT/gpu-instances-x.json`" in text


def _soak_doc() -> dict[str, object]:
    """The shape bench/soak.py writes (tests/unit/test_soak.py renders a real run's JSON too)."""
    swaps = [0, 100, 200, 300]
    series = {
        "tiny_cnn_0_0/rss_bytes": {"unit": "bytes", "what": "resident memory", "values": [2.7e8, 2.8e8, 2.8e8, 2.8e8],
                                   "growth_pct_per_100_swaps": 0.0, "flat": True},
        "tiny_cnn_0_0/fds": {"unit": "count", "what": "fds", "values": [7, 7, 8, 9],
                             "growth_pct_per_100_swaps": 11.7647, "flat": False},
        "files/weights_leftovers": {"unit": "count", "what": "left", "values": [0, 0, 0, 0],
                                    "growth_pct_per_100_swaps": 0.0, "flat": True},
        "gpu/used_bytes": {"unit": "bytes", "what": "GPU", "values": [None] * 4, "growth_pct_per_100_swaps": None,
                           "flat": None, "why": "not measurable here"}}
    return {"command": "python3 -m bench.soak --swaps 300 --json bench/results/soak-x.json", "machine": {"cpus": 2},
            "models": {"names": ["tiny_cnn"], "bytes": {"tiny_cnn": 22256}}, "clients": 4, "swaps": 300,
            "sample_every": 100, "warmup_swaps": 200, "duration_s": 150.0, "requests": 90000, "errors": 0, "torn": 0,
            "publishes": {"adapter: lora": 30, "base: publish": 240, "unadapt: touch": 30},
            "publish_to_live_s": {"median": 0.12, "p99": 0.4, "max": 0.5}, "met": False,
            "gpu_memory": "the CPU run serves on KIND_CPU instances: no GPU memory to measure",
            "samples": [{"swap": s, "elapsed_s": s / 2, "answered": s * 300, "errors": 0, "torn": 0} for s in swaps],
            "series": series}


def test_a_soak_result_gets_its_table_and_its_picture(tmp_path: Path) -> None:
    (tmp_path / "soak-x.json").write_text(json.dumps(_soak_doc()))
    text = tables.measured(tmp_path)
    assert ("| `tiny_cnn` (`model_repository/`) | 4 | 300 | 30 | 150 s | 90000 | 0 | 0 | 120 ms / 500 ms | 2 of 3 "
            "| **not met** | 2 CPUs |") in text
    assert "| `tiny_cnn_0_0/fds` | 8 | 9 | 11.8 % | **no** |" in text
    assert "| `tiny_cnn_0_0/rss_bytes` | 280.0 MB | 280.0 MB | 0 % | yes |" in text
    assert "| `gpu/used_bytes` | n/a | n/a | not measurable here | n/a |" in text
    assert "`python3 -m bench.soak --swaps 300 --json bench/results/soak-x.json`" in text
    [picture] = figures.pictures(tmp_path)
    svg = picture.svg()
    assert picture.name == "soak-x" and svg.startswith(b"<?xml") and svg == picture.svg()
    assert "300-swap soak" in picture.alt and "(../bench/results/soak-x.json)" in picture.markdown("../", "figures")
    assert "300 swaps" in glance.zero_downtime(tmp_path)
