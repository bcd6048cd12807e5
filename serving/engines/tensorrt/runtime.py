"""The real TensorRT pieces: the only module that touches ``tensorrt`` at run time.

A :class:`TrtRuntime` (``trt.Runtime`` with a logger that keeps the last errors) deserializes
engines and makes their ``trt.Refitter``; :class:`TrtBackend` wraps CUDA tensors as ``trt.Weights``
for the slot's refits; :class:`TrtHandle` runs one engine with its own execution context. All of
them import ``tensorrt`` inside their functions, so importing this module needs no TensorRT; calls
follow the TensorRT 10.x/11.x Python API docstrings and are checked by ``mypy --strict`` against
``tensorrt-stubs`` (``mypy-tensorrt.ini``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from serving.engines.tensorrt.slot import RefitterLike, StreamLike
from serving.errors import ConfigError, EngineBuildError, NotReadyError, RefitError
from serving.specs import dtype_name

if TYPE_CHECKING:  # type checking only: at run time TensorRT is imported inside functions
    import tensorrt as trt

log = logging.getLogger(__name__)

#: ``trt.DataType`` member name -> torch dtype (the types hotswap hands to or reads from TensorRT)
_TRT_TO_TORCH: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
}
_TORCH_TO_TRT = {v: k for k, v in _TRT_TO_TORCH.items()}


def trt_dtype_to_torch(trt_dtype: Any) -> torch.dtype | None:
    """``trt.DataType.HALF`` -> ``torch.float16`` (by member name; ``None`` for FP8/FP4/INT4...)."""
    return _TRT_TO_TORCH.get(str(getattr(trt_dtype, "name", trt_dtype)))


def torch_dtype_to_trt_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"HALF"`` (the ``trt.DataType`` member)."""
    if dtype not in _TORCH_TO_TRT:
        raise RefitError(f"dtype {dtype_name(dtype)} has no TensorRT weights type")
    return _TORCH_TO_TRT[dtype]


def make_logger() -> tuple[trt.ILogger, list[str]]:
    """A ``trt.ILogger`` that forwards to ``logging`` and keeps the last errors (returned list).

    Documented pattern (``tensorrt.ILogger`` docstring): subclass ``ILogger``, call
    ``ILogger.__init__`` explicitly and implement ``log(severity, msg)``.
    """
    import tensorrt as trt

    messages: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                messages[:] = [*messages[-49:], msg]
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return Logger(), messages


class TrtBackend:
    """The real :class:`~serving.engines.tensorrt.slot.RefitBackend`: ``trt.Weights`` on device memory."""

    def __init__(self, messages: list[str]) -> None:
        import tensorrt as trt

        self.messages = messages
        self.device_location: Any = trt.TensorLocation.DEVICE

    def make_weights(self, tensor: torch.Tensor) -> trt.Weights:
        import tensorrt as trt

        # trt.Weights(type, ptr, count) wraps memory without copying (the call Torch-TensorRT's
        # _refit_single_trt_engine_with_gm makes); the tensor must stay alive until the refit has run
        dt: trt.DataType = getattr(trt.DataType, torch_dtype_to_trt_name(tensor.dtype))
        return trt.Weights(dt, tensor.data_ptr(), tensor.numel())

    def prototype(self, refitter: RefitterLike, name: str) -> tuple[torch.dtype | None, int]:
        # get_weights_prototype docs: same dtype and size as the build-time weights; size -1 for unknown names
        proto = refitter.get_weights_prototype(name)
        return trt_dtype_to_torch(proto.dtype), int(proto.size)

    def stream_context(self, stream: StreamLike) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(cast(torch.cuda.Stream, stream))

    def errors(self) -> list[str]:
        return list(self.messages)


class TrtHandle:
    """An ``ICudaEngine`` and its ``IExecutionContext``, run with ``execute_async_v3`` on one stream."""

    def __init__(self, engine: trt.ICudaEngine, input_names: Sequence[str], output_names: Sequence[str],
                 device: torch.device, stream: torch.cuda.Stream) -> None:
        self.engine: trt.ICudaEngine | None = engine
        context = engine.create_execution_context()
        if context is None:
            raise EngineBuildError("TensorRT could not create an execution context (out of GPU memory?)")
        self.context: trt.IExecutionContext | None = context
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.device = device
        self.stream = stream

    def _live(self) -> tuple[trt.ICudaEngine, trt.IExecutionContext]:
        if self.engine is None or self.context is None:
            raise NotReadyError("tensorrt engine: this slot was closed")
        return self.engine, self.context

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        engine, context = self._live()
        if len(inputs) != len(self.input_names):
            raise ConfigError(f"the engine takes {len(self.input_names)} inputs {self.input_names}, "
                              f"got {len(inputs)}")
        outs: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name, x in zip(self.input_names, inputs, strict=True):
                want = trt_dtype_to_torch(engine.get_tensor_dtype(name)) or x.dtype
                xt = x.to(self.device, dtype=want, non_blocking=True).contiguous()
                if not context.set_input_shape(name, tuple(xt.shape)):
                    raise ConfigError(f"input {name}: shape {tuple(xt.shape)} is outside the engine's "
                                      "optimization profile (batch 1..max_batch)")
                context.set_tensor_address(name, xt.data_ptr())
                xs.append(xt)
            for name in self.output_names:
                dims = context.get_tensor_shape(name)
                shape = tuple(int(dims[i]) for i in range(len(dims)))
                if any(d < 0 for d in shape):
                    raise EngineBuildError(f"output {name} has a data-dependent shape {shape}; not supported")
                dt = trt_dtype_to_torch(engine.get_tensor_dtype(name)) or torch.float32
                out = torch.empty(shape, dtype=dt, device=self.device)
                context.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 returned False")
        self.stream.synchronize()  # outputs complete, inputs may be freed, no pending work before a refit
        xs.clear()
        return outs

    def serialize_refittable(self) -> bytes:
        import tensorrt as trt

        engine, _ = self._live()
        # Same flags as Torch-TensorRT's refit_module_weights (dynamo/_refit.py): clear EXCLUDE_WEIGHTS,
        # set INCLUDE_REFIT (TensorRT >= 10.14, absent from the 10.13 stubs, hence getattr) so the
        # deserialized engine can be refitted again.
        config = engine.create_serialization_config()
        config.clear_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
        config.set_flag(getattr(trt.SerializationFlag, "INCLUDE_REFIT"))  # noqa: B009
        return bytes(engine.serialize_with_config(config))

    def close(self) -> None:
        self.context = None
        self.engine = None


class TrtRuntime:
    """A ``trt.Runtime`` and its logger: deserializes engines and makes their refitters."""

    def __init__(self) -> None:
        import tensorrt as trt

        self.logger, self.messages = make_logger()
        self.runtime = trt.Runtime(self.logger)

    def deserialize(self, data: bytes, what: str = "the engine") -> trt.ICudaEngine:
        """An ``ICudaEngine`` from a serialized one; :class:`EngineBuildError` with TensorRT's last errors."""
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {what}: "
                                   + ("; ".join(self.messages[-3:]) or "no message"))
        return engine

    def refitter(self, engine: trt.ICudaEngine) -> trt.Refitter:
        """A ``trt.Refitter`` of ``engine`` (reports through this runtime's logger)."""
        import tensorrt as trt

        return trt.Refitter(engine, self.logger)

    def backend(self) -> TrtBackend:
        """The refit backend of a slot, reading this runtime's error messages."""
        return TrtBackend(self.messages)


def engine_weight_names(stripped: bytes) -> list[str]:
    """``Refitter.get_all_weights()`` of a freshly built engine (deserialized once, then released)."""
    runtime = TrtRuntime()
    engine = runtime.deserialize(stripped, "the engine it just built")
    names = list(runtime.refitter(engine).get_all_weights())
    del engine
    return names



__all__ = [
    "TrtBackend", "TrtHandle", "TrtRuntime", "engine_weight_names", "make_logger", "torch_dtype_to_trt_name",
    "trt_dtype_to_torch",
]
