"""The TensorRT runtime module without TensorRT: its dtype maps, and that it is the only importer of ``tensorrt``."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import serving.engines.tensorrt
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


def test_only_the_runtime_module_imports_tensorrt() -> None:
    """``import tensorrt`` (outside ``if TYPE_CHECKING``) appears in runtime.py and nowhere else in the package."""
    package = Path(serving.engines.tensorrt.__file__).parent
    importers = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if id(node) not in type_only and any(n.split(".")[0] == "tensorrt" for n in names):
                importers.add(str(path.relative_to(package)))
    assert importers == {"runtime.py"}
