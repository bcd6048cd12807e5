"""Pure parsing of Triton's model configuration (the JSON the Python backend receives)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from serving.errors import ConfigError
from serving.specs import TensorSpec
from serving.triton.version_output import MAX_UTF8_WIDTH, MIN_UTF8_WIDTH, VERSION_OUTPUT, VERSION_UTF8_OUTPUT

#: Triton data types we serve -> torch dtypes
TRITON_DTYPES: dict[str, torch.dtype] = {
    "TYPE_FP32": torch.float32, "TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16,
    "TYPE_FP64": torch.float64, "TYPE_INT64": torch.int64, "TYPE_INT32": torch.int32,
    "TYPE_INT16": torch.int16, "TYPE_INT8": torch.int8, "TYPE_UINT8": torch.uint8, "TYPE_BOOL": torch.bool,
}


@dataclass(frozen=True)
class ModelIO:
    """Inputs, outputs (without the batch dimension) and the batch range of a Triton model.

    ``outputs`` are the engine's; ``version_output`` says whether the config also declares
    :data:`VERSION_OUTPUT`, ``version_utf8_width`` the width of :data:`VERSION_UTF8_OUTPUT` (0: not declared);
    both are filled by the backend, not the engine (:mod:`serving.triton.version_output`).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int
    parameters: Mapping[str, str]
    version_output: bool = False
    version_utf8_width: int = 0


def _specs(entries: list[dict[str, Any]], what: str, errors: list[str]) -> tuple[TensorSpec, ...]:
    out = []
    for e in entries:
        name, dt = e.get("name", "?"), e.get("data_type", "")
        dims = tuple(int(d) for d in e.get("dims", []))
        if dt not in TRITON_DTYPES:
            errors.append(f"{what} {name!r}: data_type {dt!r} is not supported; use one of {sorted(TRITON_DTYPES)}")
            continue
        if any(d < 0 for d in dims):
            errors.append(f"{what} {name!r}: dims {list(dims)} must be fixed (only the batch dimension is "
                          "dynamic, through max_batch_size)")
        out.append(TensorSpec(name, TRITON_DTYPES[dt], dims))
    return tuple(out)


def parse_model_io(config: Mapping[str, Any]) -> ModelIO:
    """Inputs, outputs, max_batch_size and string parameters from the model config JSON."""
    errors: list[str] = []
    name = config.get("name", "?")
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch < 1:
        errors.append("max_batch_size must be >= 1: the engine is built for a dynamic batch [1, max_batch_size]")
    inputs = _specs(list(config.get("input", [])), "input", errors)
    declared = list(config.get("output", []))
    version = [e for e in declared if e.get("name") == VERSION_OUTPUT]
    for e in version:
        if e.get("data_type") != "TYPE_STRING" or [int(d) for d in e.get("dims", [])] != [1]:
            errors.append(f"output {VERSION_OUTPUT!r}: declare it as data_type: TYPE_STRING, dims: [ 1 ] "
                          f"(found {e.get('data_type')!r}, dims {e.get('dims')})")
    utf8_width = _utf8_width([e for e in declared if e.get("name") == VERSION_UTF8_OUTPUT], errors)
    outputs = _specs([e for e in declared if e.get("name") not in (VERSION_OUTPUT, VERSION_UTF8_OUTPUT)],
                     "output", errors)
    if not inputs:
        errors.append("the config declares no input")
    if not outputs:
        errors.append("the config declares no output")
    params = {k: str(v.get("string_value", "")) for k, v in dict(config.get("parameters", {})).items()}
    if errors:
        raise ConfigError(f"model {name!r}: config.pbtxt:\n" + "\n".join(f"  - {e}" for e in errors))
    return ModelIO(inputs, outputs, max_batch, params, version_output=bool(version), version_utf8_width=utf8_width)


def _utf8_width(entries: list[dict[str, Any]], errors: list[str]) -> int:
    """The declared width of :data:`VERSION_UTF8_OUTPUT` (0 when not declared)."""
    for e in entries:
        dims = [int(d) for d in e.get("dims", [])]
        if (e.get("data_type") != "TYPE_UINT8" or len(dims) != 1
                or not MIN_UTF8_WIDTH <= dims[0] <= MAX_UTF8_WIDTH):
            errors.append(f"output {VERSION_UTF8_OUTPUT!r}: declare it as data_type: TYPE_UINT8, dims: [ N ] with "
                          f"{MIN_UTF8_WIDTH} <= N <= {MAX_UTF8_WIDTH}, e.g. [ 64 ] (found {e.get('data_type')!r}, "
                          f"dims {e.get('dims')})")
            return 0
        return dims[0]
    return 0
