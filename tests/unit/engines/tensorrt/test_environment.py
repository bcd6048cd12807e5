"""Whether the TensorRT engine can run here, and the message when it cannot (this machine has no TensorRT)."""

from __future__ import annotations

import sys

import pytest
import torch

from serving.engines.tensorrt import TensorRTEngine, parse_version, probe_environment, unavailable_message
from serving.errors import EngineUnavailableError
from serving.examples import CNN, example_build_spec


def test_build_without_tensorrt_says_what_is_missing_and_how_to_install() -> None:
    spec = example_build_spec(CNN, device="cuda")
    with pytest.raises(EngineUnavailableError) as info:
        TensorRTEngine.build(spec)
    msg = str(info.value)
    assert msg.startswith("engine 'tensorrt' is not available on this machine:")
    assert "TensorRT" in msg and ">= 10.14" in msg
    assert "pip install 'trt-hotswap[tensorrt]'" in msg and "NGC Triton container" in msg
    assert "Traceback" not in msg
    assert info.value.reason == "engine_unavailable"


def test_missing_tensorrt_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineUnavailableError, match=r"the TensorRT Python package cannot be imported"):
        probe_environment(torch.device("cuda"))


def test_cpu_device_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineUnavailableError, match=r"device 'cpu' is not a CUDA device; set device 'cuda'"):
        probe_environment(torch.device("cpu"))


def test_registry_reports_the_same_message() -> None:
    from serving.engines import build_engine

    with pytest.raises(EngineUnavailableError, match=r"pip install 'trt-hotswap\[tensorrt\]'"):
        build_engine("tensorrt", example_build_spec(CNN, device="cuda"))


def test_unavailable_message_lists_every_problem() -> None:
    msg = unavailable_message(["a is missing", "b is too old"])
    assert "  - a is missing\n  - b is too old\n" in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("10.14.1.48.post1", (10, 14, 1, 48)), ("10.13.3.9", (10, 13, 3, 9)), ("2.13.0+cu130", (2, 13, 0)),
    ("2.10.0a0", (2, 10, 0)), ("11.0.0.114", (11, 0, 0, 114)),
])
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected
    assert (parse_version(text) >= (10, 14)) == (expected >= (10, 14))
