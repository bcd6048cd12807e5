from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import CheckpointError, ConfigError, ModelError, NotReadyError, for_model, reading


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


def test_reading_says_what_failed_and_can_name_the_path_as_given(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="x: cannot stat: ") as e, reading("x", action="cannot stat"):
        raise IsADirectoryError(21, "Is a directory")
    assert e.value.reason == "unreadable"
    link = tmp_path / "v1.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint .*v1\.safetensors: does not exist") as e, \
            reading(f"checkpoint {link}", gone="does not exist", gone_reason="not_found", os_name=False):
        link.resolve(strict=True)
    assert "nowhere" not in str(e.value) and e.value.reason == "not_found"


def test_for_model_names_the_model_once_and_keeps_the_reason() -> None:
    with pytest.raises(ModelError, match=r"^model 'my_bert': x.safetensors: bad$") as e, for_model("my_bert"):
        raise CheckpointError("x.safetensors: bad", reason="corrupt")
    assert e.value.reason == "corrupt" and e.value.model == "my_bert" and isinstance(e.value.error, CheckpointError)
    with pytest.raises(NotReadyError, match=r"^model 'my_bert' has no valid weights$"), for_model("my_bert"):
        raise NotReadyError("model 'my_bert' has no valid weights")  # already named: left as it is
    with pytest.raises(ModelError, match=r"^model 'inner': bad$"), for_model("outer"), \
            for_model("inner"):
        raise ConfigError("bad")
    with pytest.raises(KeyError), for_model("my_bert"):  # not one of ours: untouched
        raise KeyError("x")
