"""Start, stop and restart a real Triton: clean shutdown with the watcher running, same version after restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.triton.scrape import scrape, weights_versions

from .conftest import random_checkpoint, start_server

pytestmark = pytest.mark.integration


def test_restart_keeps_the_live_version_and_shutdown_is_clean(tmp_path: Path, engine_cache_dir: Path) -> None:
    # its own server, on the session's engine cache (warm: tiny_transformer's engine is in it)
    weights = tmp_path / "weights"
    first = start_server(tmp_path / "run1", weights, engine_cache_dir)
    try:
        random_checkpoint("tiny_transformer", 41, tmp_path / "v41.safetensors").replace(
            weights / "tiny_transformer" / "v41.safetensors")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if set(weights_versions(scrape(first.metrics_url), "tiny_transformer").values()) == {"v41"}:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(first.log_tail())
    finally:
        t0 = time.monotonic()
        rc = first.stop(timeout=60)
        stop_s = time.monotonic() - t0
    assert rc == 0, first.log_tail()
    assert stop_s < 30, f"shutdown took {stop_s:.1f}s"
    log = first.log_tail(200_000)
    assert "watcher stopped" in log, log[-3000:]

    second = start_server(tmp_path / "run2", weights, engine_cache_dir)
    try:
        samples = scrape(second.metrics_url)
        assert set(weights_versions(samples, "tiny_transformer").values()) == {"v41"}
        log2 = second.log_tail(200_000)
        assert "cache hit" in log2 and "s saved" in log2, log2[-3000:]
    finally:
        assert second.stop(timeout=60) == 0


def test_model_without_valid_weights_is_not_ready_and_says_why(tmp_path: Path) -> None:
    import os
    import shutil

    from serving.triton.server import TritonProcess

    from .conftest import REPOSITORY

    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "tiny_cnn", repo / "tiny_cnn")
    weights = tmp_path / "weights"
    (weights / "tiny_cnn").mkdir(parents=True)
    (weights / "tiny_cnn" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights), HOTSWAP_CACHE_DIR=str(tmp_path / "cache"))
    server = TritonProcess(repo, work_dir=tmp_path / "run", env=env)
    server.start()
    try:
        deadline = time.monotonic() + 120
        index: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            index = server.repository_index()
            if index and index[0].get("state") == "UNAVAILABLE":
                break
            time.sleep(0.5)
        assert index and index[0].get("state") == "UNAVAILABLE", (index, server.log_tail())
        reason = str(index[0].get("reason"))
        assert "no valid weights" in reason and "broken.safetensors" in reason, reason
        assert not server.model_ready("tiny_cnn")
    finally:
        server.stop(timeout=60)
