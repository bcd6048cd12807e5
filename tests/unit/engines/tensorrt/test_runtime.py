"""The pure parts of the TensorRT runtime module: TensorRT <-> torch dtypes (no TensorRT here)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from serving.engines.tensorrt import torch_dtype_to_trt_name, trt_dtype_to_torch
from serving.errors import RefitError


def test_dtype_names() -> None:
    @dataclass
    class FakeDataType:
        name: str

    assert trt_dtype_to_torch(FakeDataType("HALF")) is torch.float16
    assert trt_dtype_to_torch(FakeDataType("FP8")) is None
    assert torch_dtype_to_trt_name(torch.bfloat16) == "BF16"
    with pytest.raises(RefitError, match="float64 has no TensorRT weights type"):
        torch_dtype_to_trt_name(torch.float64)
