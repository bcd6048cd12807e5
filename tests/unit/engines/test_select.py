"""Engine selection: ``auto`` per device, with the reason for the startup log; named engines as asked."""

from __future__ import annotations

import sys

import pytest
import torch

from serving.engines import select_engine
from serving.errors import ConfigError


def test_auto_on_cpu_is_aoti() -> None:
    assert select_engine("auto", "cpu").kind == "aoti"


def test_named_engine_is_used_as_asked() -> None:
    assert select_engine("inductor", "cuda:0").kind == "inductor"
    with pytest.raises(ConfigError, match="unknown engine"):
        select_engine("onnx", "cpu")


def test_auto_on_a_gpu_without_tensorrt_is_inductor_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    choice = select_engine("auto", "cuda:0")
    assert choice.kind == "inductor"
    assert "TensorRT cannot run here" in choice.reason and "TensorRT Python package cannot be imported" in choice.reason


def test_auto_on_a_gpu_without_triton_falls_to_aoti_with_both_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    choice = select_engine("auto", "cuda:0")
    assert choice.kind == "aoti" and "neither can inductor" in choice.reason and "triton" in choice.reason
