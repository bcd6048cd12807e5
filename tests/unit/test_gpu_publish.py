"""bench/gpu_publish.py's pure parts and the library parts it reads the server with: variants, a swap's timeline
(bench.lib.phases), latencies by phase, reading the server log (bench.lib.serverlog)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gpu_publish import parse_variant
from bench.lib.phases import latency_by_phase, phases
from bench.lib.serverlog import hashed_after


def test_variants_name_a_model_and_its_parameters() -> None:
    assert parse_variant("t8:weights_reader_threads=8,weights_read_bytes=67108864") == (
        "t8", {"weights_reader_threads": "8", "weights_read_bytes": "67108864"})
    assert parse_variant("plain") == ("plain", {})
    with pytest.raises(ValueError, match="letters, digits or _"):
        parse_variant("t 8:x=1")


def test_a_swap_timeline_lays_the_stages_end_to_end_from_the_rename() -> None:
    swap = {"rename_at": 100.0, "publish_to_first_response_s": 0.5, "hashed_after_s": 2.0,
            "stages_ms": {"total": 400.0, "settle": 10.0, "hash": 0.0, "transfer": 300.0, "verify": 40.0}}
    got = phases(swap)
    assert [name for name, _, _ in got] == ["settle", "transfer", "verify", "answer", "hash_after"]
    assert got[0] == ("settle", 100.0, pytest.approx(100.01))
    assert got[1][1] == pytest.approx(100.01) and got[1][2] == pytest.approx(100.31)
    assert got[3][1:] == (pytest.approx(100.35), 100.5)
    assert got[4][1:] == (100.5, 102.5)


def test_each_request_counts_for_the_phase_it_overlapped_most() -> None:
    timeline = [("transfer", 10.0, 11.0), ("verify", 11.0, 11.1), ("hash_after", 11.1, 13.0)]
    samples = [(1.0, 0.004), (2.0, 0.006),  # steady
               (10.5, 0.030), (10.9, 0.150),  # mostly in the transfer
               (11.02, 0.1),  # 0.08 s in verify, 0.02 s in hash_after
               (12.0, 0.005)]
    by = latency_by_phase(samples, [timeline])
    assert by["steady"]["requests"] == 2 and by["steady"]["max"] == pytest.approx(6.0)
    # bench.lib.stats.percentile: halfway between 30 and 150 ms
    assert by["transfer"]["requests"] == 2 and by["transfer"]["p50"] == pytest.approx(90.0)
    assert by["verify"]["requests"] == 1 and by["hash_after"]["requests"] == 1
    assert sum(v["requests"] for v in by.values()) == len(samples)


def test_hashed_after_reads_the_watchers_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("refit v3-7 -> success (ok) \n"  # the coordinator's line comes first and is not the summary
                   "refit v3-7 -> success in 600 ms from the first event (settle 5, transfer 500, hashed after going "
                   "live)\nweights folder: v3-7 hashed after it went live (1800 ms)\n"
                   "refit v4-8 -> success in 90 ms from the first event (settle 5, hash 40, transfer 40)\n")
    assert hashed_after(log, "v3-7", timeout=1.0) is not None
    assert hashed_after(log, "v4-8", timeout=1.0) is None  # hashed before it went live: nothing to wait for
