"""Fixtures shared by the watcher, hostile-file and LoRA tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from watch_helpers import Rig


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty weights folder."""
    d = tmp_path / "weights"
    d.mkdir()
    return d


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Rigs made by a test; each is closed (watcher stopped) at its end."""
    made: list[Rig] = []
    yield made
    for r in made:
        r.close()
