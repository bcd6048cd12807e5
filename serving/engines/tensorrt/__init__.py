"""TensorRT engine: weight-stripped, refittable engines from Torch-TensorRT, refitted in place.

One module per job:

* :mod:`.environment`: is TensorRT usable here (versions, GPU); the message and install hint if not;
* :mod:`.options`: :class:`TrtBuildOptions`, the build and refit options, each described once
  (:data:`OPTIONS`);
* :mod:`.cache_bridge`: our stripped-engine cache behind Torch-TensorRT's, with the stricter key;
* :mod:`.build`: the Torch-TensorRT conversion and the derivation and check of the weight map;
* :mod:`.mapping`: how each engine weight is computed from checkpoint tensors (pure torch, JSON);
* :mod:`.slot`: :class:`TensorRTSlot`, the refit control flow, against protocols;
* :mod:`.runtime`: the real TensorRT runtime, refitter backend and execution handle, the only
  module that touches ``tensorrt`` at run time;
* :mod:`.engine`: :class:`TensorRTEngine`, which ties them together.

Nothing here imports ``tensorrt`` or ``torch_tensorrt`` at module level: without them,
``TensorRTEngine.build`` raises :class:`~serving.errors.EngineUnavailableError` saying what is
missing and how to install it. TensorRT calls follow the Python API docstrings of
``tensorrt.Refitter`` (TensorRT 10.x/11.x); Torch-TensorRT calls follow its sources 2.10-2.14.
"""

from __future__ import annotations

from serving.engines.tensorrt.cache_bridge import (
    TRT_ENTRY_SCHEMA,
    CacheBridge,
    EngineCacheLike,
    TrtEntry,
    make_torch_trt_cache,
    read_trt_entry,
    trt_cache_key,
    trt_entry_files,
    trt_key_fields,
)
from serving.engines.tensorrt.engine import TensorRTEngine, engine_nbytes_fraction
from serving.engines.tensorrt.environment import (
    INSTALL_HINT,
    MIN_TENSORRT,
    MIN_TORCH_TENSORRT,
    TrtEnvironment,
    parse_version,
    probe_environment,
    unavailable_message,
)
from serving.engines.tensorrt.options import OPTIONS, OptionInfo, TrtBuildOptions
from serving.engines.tensorrt.runtime import make_logger, torch_dtype_to_trt_name, trt_dtype_to_torch
from serving.engines.tensorrt.slot import EngineHandle, RefitBackend, RefitterLike, StreamLike, TensorRTSlot

__all__ = [
    "TRT_ENTRY_SCHEMA", "CacheBridge", "EngineCacheLike", "EngineHandle", "INSTALL_HINT", "MIN_TENSORRT",
    "MIN_TORCH_TENSORRT", "OPTIONS", "OptionInfo", "RefitBackend", "RefitterLike", "StreamLike", "TensorRTEngine",
    "TensorRTSlot", "TrtBuildOptions", "TrtEntry", "TrtEnvironment", "engine_nbytes_fraction", "make_logger",
    "make_torch_trt_cache", "parse_version", "probe_environment", "read_trt_entry", "torch_dtype_to_trt_name",
    "trt_cache_key", "trt_dtype_to_torch", "trt_entry_files", "trt_key_fields", "unavailable_message",
]
