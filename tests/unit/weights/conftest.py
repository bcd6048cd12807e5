"""Fixtures for the checkpoint tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import SafeOpenSpy


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[SafeOpenSpy]:
    """Records which safetensors files are opened and which tensors are read."""
    yield SafeOpenSpy(monkeypatch)
