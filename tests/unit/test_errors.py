from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import CheckpointError, reading


def test_reading_maps_os_errors_to_counted_reasons(tmp_path: Path) -> None:
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(CheckpointError, match="gone.safetensors: no such file") as e, \
            reading("the checkpoint", gone="no such file", gone_reason="not_found"):
        missing.read_bytes()
    assert e.value.reason == "not_found"
    with pytest.raises(CheckpointError, match="permission denied") as e, reading("x"):
        raise PermissionError(13, "Permission denied", "x.safetensors")
    assert e.value.reason == "unreadable"
    with pytest.raises(CheckpointError, match="x: cannot read") as e, reading("x"):
        raise IsADirectoryError(21, "Is a directory")
    assert e.value.reason == "unreadable"
