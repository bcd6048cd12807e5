"""bench/loaders.py at a tiny size on the CPU: the loaders that run here are measured and verified, the ones whose
library is missing are recorded as skipped, and a loader that leaves wrong bytes is caught."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.loaders import Dest, Loader, checksum, main


def noop(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, object]:
        return {}  # leaves the zeroed destinations as they are

    return Loader("noop", "none", load)


def test_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "loaders.json"
    doc = main(["--dry-run", "--json", str(out), "--loaders", "pinned-t4,kvikio-t8-m4,safe_open,noop"],
               extra={"noop": noop})
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["command"].startswith("python3 -m bench.loaders --dry-run")
    assert doc["config"]["device"] == "cpu" and doc["file"]["bytes"] > 15_000_000
    by = {e["name"]: e for e in doc["loaders"]}
    for name in ("pinned-t4", "safe_open"):
        e = by[name]
        assert e["verified"] and e["gbps"] > 0 and e["cpu_s_per_gb"] is not None, e
        assert e["runs"][0]["requests"] > 0 and e["runs"][0]["p99_ms"] is not None
    assert by["pinned-t4"]["runs"][0]["transfer"] == "cpu" and by["pinned-t4"]["threads"] == 4
    kvikio = by["kvikio-t8-m4"]
    assert kvikio["task_mib"] == 4
    assert kvikio.get("verified") or kvikio["skipped"].startswith("kvikio does not import")
    assert by["noop"]["verified"] is False and by["noop"]["runs"][0]["mismatched"]
    assert doc["steady"]["requests"] > 0


def test_checksums_see_a_shift() -> None:
    t = torch.randn(1000).half()
    assert checksum(t) == checksum(t.clone())
    assert checksum(t) != checksum(torch.roll(t, 2))
    assert checksum(t) != checksum(torch.zeros_like(t))
