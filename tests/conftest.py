"""Shared fixtures: every test must stop the threads it starts; a test marked ``requires_tool`` skips, naming
the program and how to install it, where that program is missing (tests/system_tools.py); engines that unit and
integration tests share are compiled once per session (tests/session_engines.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from system_tools import require_tool

if TYPE_CHECKING:  # imported by the fixture: tests that need no engine (tests/deploy) do not import torch for it
    from session_engines import CompiledEngine

try:  # libraries the tests use (transformers, peft, torch_tensorrt) show tqdm progress bars, whose monitor thread
    import tqdm  # outlives any test; it is not a thread of ours, so it is not started at all

    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (joined with a short grace period)."""
    before = _live_threads()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _live_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _live_threads() - before
    if leaked:
        pytest.fail(f"test leaked threads: {sorted(t.name for t in leaked)}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.requires_tool("rsync", ...)``: skip (fail on CI) before any fixture starts a server."""
    for mark in item.iter_markers("requires_tool"):
        for name in mark.args:
            require_tool(name)


@pytest.fixture(scope="session")
def aoti_transformer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompiledEngine]:
    """The example transformer's AOTInductor engine, compiled once per session into a cache of its own (a miss).
    tests/unit/test_engine_aoti.py checks this build; the integration servers start from a copy of its cache,
    so tiny_transformer is a hit there instead of a second compile."""
    from session_engines import compile_aoti_transformer

    compiled = compile_aoti_transformer(tmp_path_factory.mktemp("aoti-transformer-cache"))
    try:
        yield compiled
    finally:
        compiled.engine.close()
