"""bench/loaders.py at a tiny size on the CPU: the loaders that run here are measured and verified, the ones whose
library is missing are recorded as skipped, a loader that leaves wrong bytes is caught, and docs/benchmarks.md's
section reads what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.loaders import Dest, Loader, checksum, main
from bench.render import tables


def noop(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, object]:
        return {}  # leaves the zeroed destinations as they are

    return Loader("noop", "none", load)


def broken(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, object]:
        raise OSError("the library failed")

    return Loader("broken", "none", load)


def test_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "loaders-dry.json"
    doc = main(["--dry-run", "--json", str(out), "--loaders", "pinned-t4,kvikio-t8-m4,safe_open,noop,broken"],
               extra={"noop": noop, "broken": broken})
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["command"].startswith("python3 -m bench.loaders --dry-run")
    assert doc["config"]["device"] == "cpu" and doc["file"]["bytes"] > 15_000_000
    by = {r["name"]: r for r in doc["rows"]}
    for name in ("pinned-t4", "safe_open"):
        r = by[name]
        assert r["verified"] and r["gbps"] > 0 and r["cpu_s_per_gb"] is not None, r
        assert r["runs"][0]["requests"] > 0 and r["p99_during_ms"] is not None
        assert r["p99_steady_ms"] == doc["steady"]["p99_ms"] is not None
    assert by["pinned-t4"]["runs"][0]["transfer"] == "cpu"
    assert (by["pinned-t4"]["threads"], by["pinned-t4"]["task_bytes"]) == (4, None)
    assert (by["safe_open"]["threads"], by["safe_open"]["task_bytes"]) == (None, None)
    skipped = {s["name"]: s for s in doc["skipped"]}
    if "kvikio-t8-m4" in by:
        assert by["kvikio-t8-m4"]["verified"] and by["kvikio-t8-m4"]["task_bytes"] == 4 << 20
    else:
        assert skipped["kvikio-t8-m4"]["reason"].startswith("kvikio does not import")
    assert by["noop"]["verified"] is False and by["noop"]["runs"][0]["mismatched"]
    assert [(e["what"], e["error"]) for e in doc["errors"]] == [("broken", "OSError: the library failed")]

    text = tables.loaders(tmp_path)  # the section of docs/benchmarks.md, from this file
    assert "| `pinned-t4` | 4 | n/a |" in text and "| `safe_open` | library's own | n/a |" in text
    assert "| `noop` (wrong bytes) |" in text
    assert "broken: did not complete: `OSError: the library failed`" in text
    if "kvikio-t8-m4" in skipped:
        assert "`kvikio-t8-m4`: skipped: kvikio does not import" in text


def test_checksums_see_a_shift() -> None:
    t = torch.randn(1000).half()
    assert checksum(t) == checksum(t.clone())
    assert checksum(t) != checksum(torch.roll(t, 2))
    assert checksum(t) != checksum(torch.zeros_like(t))
