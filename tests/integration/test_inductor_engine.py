"""``engine: inductor`` through a real Triton: serves the example transformer, swaps exactly, restarts from the cache.

The model repository is built here (the example transformer's config with ``engine: inductor``), so
``make serve`` keeps its own repository and start time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.triton.server import TritonProcess, seed_weights

from .conftest import INPUTS, REPOSITORY, infer, random_checkpoint, reference_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny_transformer"


def inductor_repository(dest: Path) -> Path:
    """The example repository's transformer, switched to the inductor engine."""
    shutil.copytree(REPOSITORY / MODEL, dest / MODEL)
    config = dest / MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "engine", value: \{ string_value: )"aoti"', r'\1"inductor"', config.read_text())
    assert n == 1, "the example config no longer names engine 'aoti'"
    config.write_text(text.replace("AOTInductor", "Inductor (torch.compile)"))
    return dest


def start(repo: Path, work: Path, weights: Path, cache: Path) -> TritonProcess:
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights), HOTSWAP_CACHE_DIR=str(cache),
               TORCHINDUCTOR_CACHE_DIR=str(work / "torchinductor"))  # torch's own cache starts empty too
    seed_weights(repo, env)
    server = TritonProcess(repo, work_dir=work, env=env)
    server.start()
    try:
        server.wait_ready((MODEL,), timeout=900)
    except BaseException:
        server.stop()
        raise
    return server


def versions(server: TritonProcess) -> set[str]:
    from serving.triton.scrape import scrape, weights_versions

    return set(weights_versions(scrape(server.metrics_url), MODEL).values())


def wait_for(server: TritonProcess, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if versions(server) == {version}:
            return
        time.sleep(0.2)
    raise AssertionError(f"{version} not live after {timeout}s: {versions(server)}\n{server.log_tail(4000)}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path, Path]]:
    root = tmp_path_factory.mktemp("inductor-triton")
    yield inductor_repository(root / "repo"), root / "weights", root / "cache", root


def test_inductor_engine_serves_swaps_exactly_and_restarts_from_the_cache(
        setup: tuple[Path, Path, Path, Path]) -> None:
    repo, weights, cache, root = setup
    x = INPUTS[MODEL]
    first = start(repo, root / "run1", weights, cache)
    try:
        log1 = first.log_tail(200_000)
        assert "engine inductor on cpu (set in the configuration)" in log1, log1[-3000:]
        assert re.search(r"engine inductor ready in [\d.]+s \(cache miss", log1), log1[-3000:]
        np.testing.assert_allclose(infer(first.http_url, MODEL, x), reference_output(MODEL, 0, x).numpy(),
                                   atol=1e-4, rtol=1e-4)
        src = random_checkpoint(MODEL, 31, root / "v31.safetensors")
        dest = weights / MODEL / "v31.safetensors"
        shutil.copyfile(src, dest.with_name(".v31.tmp"))
        os.replace(dest.with_name(".v31.tmp"), dest)
        wait_for(first, "v31")
        out = infer(first.http_url, MODEL, x)
        np.testing.assert_allclose(out, reference_output(MODEL, 31, x).numpy(), atol=1e-4, rtol=1e-4)
        assert np.abs(out - reference_output(MODEL, 0, x).numpy()).max() > 1e-2
    finally:
        assert first.stop(timeout=60) == 0, first.log_tail()

    second = start(repo, root / "run2", weights, cache)
    try:
        log2 = second.log_tail(200_000)
        assert versions(second) == {"v31"}
        hit = re.search(r"engine inductor ready in ([\d.]+)s \(cache hit, loaded from the engine cache "
                        r"\((\d+) graph\(s\) from it, (\d+) compiled\); the cold build took ([\d.]+)s", log2)
        assert hit, log2[-3000:]
        ready_s, from_cache, compiled, cold_s = float(hit[1]), int(hit[2]), int(hit[3]), float(hit[4])
        assert from_cache >= 2 and compiled == 0 and ready_s < cold_s, hit[0]
        np.testing.assert_allclose(infer(second.http_url, MODEL, x), reference_output(MODEL, 31, x).numpy(),
                                   atol=1e-4, rtol=1e-4)
    finally:
        assert second.stop(timeout=60) == 0, second.log_tail()
