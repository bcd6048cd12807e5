"""Shared fixtures: every test must stop the threads it starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest


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
