"""A TensorRT slot: one engine, its execution context and a ``trt.Refitter``, refitted in place.

Weights go in as CUDA tensors (``TensorLocation.DEVICE``) through ``refit_cuda_engine_async`` on the
slot's own refit stream, after the slot's inference stream has drained. Every name of
``Refitter.get_all_weights()`` is set on a slot's first refit, and every problem is found before
TensorRT is touched. A slot never runs before its first successful refit (a stripped engine returns
zeros). TensorRT itself stays behind the protocols below (:class:`RefitterLike`,
:class:`RefitBackend`, :class:`EngineHandle`, :class:`StreamLike`); the real ones are in
:mod:`serving.engines.tensorrt.runtime`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from serving.engines.base import WeightSlot
from serving.engines.tensorrt import mapping as tm
from serving.engines.tensorrt.options import TrtBuildOptions
from serving.errors import EngineBuildError, NotReadyError, RefitError
from serving.specs import dtype_name


class RefitterLike(Protocol):
    """The part of ``tensorrt.Refitter`` a slot uses (names and semantics of its docstrings)."""

    weights_validation: bool
    max_threads: int

    def get_all_weights(self) -> list[str]: ...
    def get_missing_weights(self) -> list[str]: ...
    def get_weights_prototype(self, weights_name: str) -> Any: ...
    def set_named_weights(self, name: str, weights: Any, location: Any) -> bool: ...
    def unset_named_weights(self, weights_name: str) -> bool: ...
    def refit_cuda_engine_async(self, stream_handle: int) -> bool: ...


class StreamLike(Protocol):
    """A CUDA stream as ``torch.cuda.Stream`` offers it."""

    @property
    def cuda_stream(self) -> int: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: ...


class RefitBackend(Protocol):
    """How a slot makes TensorRT weights and reads prototypes (the real one wraps ``tensorrt``)."""

    device_location: Any  # trt.TensorLocation.DEVICE

    def make_weights(self, tensor: torch.Tensor) -> Any: ...
    def prototype(self, refitter: RefitterLike, name: str) -> tuple[torch.dtype | None, int]: ...
    def stream_context(self, stream: StreamLike) -> contextlib.AbstractContextManager[Any]: ...
    def errors(self) -> list[str]: ...


class EngineHandle(Protocol):
    """Runs one deserialized engine with its own execution context."""

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...
    def serialize_refittable(self) -> bytes: ...
    def close(self) -> None: ...


@dataclass
class _SlotState:
    loaded: bool = False  # engine holds a complete weight set: runnable
    current: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint tensors it holds (host refs)
    refits: int = 0


class TensorRTSlot(WeightSlot):
    """One engine + context + refitter. Refit and run are serialized by a lock of the slot."""

    def __init__(self, *, weight_map: tm.WeightMap, literals: Mapping[str, torch.Tensor],
                 refitter: RefitterLike, backend: RefitBackend, handle: EngineHandle,
                 refit_stream: StreamLike, infer_stream: StreamLike, device: torch.device,
                 options: TrtBuildOptions, preloaded: bool = False) -> None:
        self.weight_map = weight_map
        self.records = weight_map.by_name()
        self.literals = literals
        self.refitter = refitter
        self.backend = backend
        self.handle = handle
        self.refit_stream = refit_stream
        self.infer_stream = infer_stream
        self.device = device
        # documented Refitter attributes; TensorRT validates weights (e.g. NaN/Inf) when this is on
        refitter.weights_validation = options.weights_validation
        if options.max_threads:
            refitter.max_threads = options.max_threads
        self.required = tuple(refitter.get_all_weights())
        unknown = sorted(set(self.required) - set(self.records))
        if unknown:
            raise EngineBuildError(f"engine has refittable weights the weight map does not cover: {unknown[:10]} "
                                   f"({len(unknown)} in all); rebuild the engine (clear its cache entry)")
        self.state = _SlotState(loaded=preloaded)
        self._lock = threading.Lock()
        self._staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (host, device)

    @property
    def ready(self) -> bool:
        return self.state.loaded

    @property
    def refit_count(self) -> int:
        return self.state.refits

    # ------------------------------------------------------------------ transfer
    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors -> device, on the refit stream, off the serving path."""
        out: dict[str, torch.Tensor] = {}
        with self.backend.stream_context(self.refit_stream):
            for name, t in weights.items():
                out[name] = t.to(self.device, non_blocking=True)
        self.refit_stream.synchronize()
        self._staged = {k: (weights[k], v) for k, v in out.items()}
        return out

    # ------------------------------------------------------------------ refit
    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        with self._lock:
            self._refit_locked(weights)

    def _validate(self, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        specs = self.weight_map.sources
        ignored = set(self.weight_map.ignored)
        problems: list[str] = []
        given: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            spec = specs.get(name)
            if spec is None:
                if name not in ignored:
                    problems.append(f"{name}: not a tensor this engine reads")
                continue
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                problems.append(f"{name}: expected {list(spec.shape)} {dtype_name(spec.dtype)}, "
                                f"found {list(t.shape)} {dtype_name(t.dtype)}")
                continue
            if t.device != self.device:
                problems.append(f"{name}: on {t.device}, the engine needs it on {self.device} (transfer first)")
                continue
            given[name] = t
        complete = set(self.state.current) >= set(specs)
        if not complete:
            missing = sorted(set(specs) - set(self.state.current) - set(given))
            if missing:
                problems.append(f"the first refit of a slot must provide every tensor the engine reads; "
                                f"missing {missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10
                                                              else ""))
        return given, problems

    def _source_tensor(self, name: str, given: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if name in given:
            return given[name]
        held = self.state.current[name]
        return held if held.device == self.device else held.to(self.device, non_blocking=True)

    def _compute(self, names: Sequence[str], given: Mapping[str, torch.Tensor],
                 problems: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in names:
            rec = self.records.get(name)
            if rec is None:
                problems.append(f"engine weight {name!r}: no record in the weight map")
                continue
            try:
                srcs = {s: self._source_tensor(s, given) for s in rec.sources}
                t = tm.materialize(rec, srcs, self.literals)
            except (tm.MappingError, KeyError) as e:
                problems.append(str(e))
                continue
            proto_dtype, proto_size = self.backend.prototype(self.refitter, name)
            if proto_size < 0:
                problems.append(f"engine weight {name!r}: the engine has no refittable weight of that name")
            elif proto_size != t.numel() or proto_dtype != t.dtype:
                problems.append(f"engine weight {name!r}: engine expects {proto_size} x "
                                f"{dtype_name(proto_dtype) if proto_dtype else 'unsupported type'}, "
                                f"computed {t.numel()} x {dtype_name(t.dtype)}")
            out[name] = t
        return out

    def _refit_locked(self, weights: Mapping[str, torch.Tensor]) -> None:
        given, problems = self._validate(weights)
        if problems:
            raise RefitError("TensorRT refit refused, nothing changed:\n" + "\n".join(f"  - {p}" for p in problems))
        first = not (set(self.state.current) >= set(self.weight_map.sources))
        targets = list(self.required) if first else [r.name for r in self.weight_map.dependents(given)
                                                     if r.name in set(self.required)]
        if not targets:
            self._commit(given)
            return
        # Refitter docs: "The behavior is undefined if the engine has pending enqueued work on a different
        # stream from the provided one." Inference runs on infer_stream: drain it first.
        self.infer_stream.synchronize()
        set_names: list[str] = []
        tensors: dict[str, torch.Tensor] = {}
        try:
            with self.backend.stream_context(self.refit_stream):
                tensors = self._compute(targets, given, problems)
                if problems:
                    raise RefitError("TensorRT refit refused, nothing changed:\n"
                                     + "\n".join(f"  - {p}" for p in problems))
                self._set(tensors, set_names, problems)
                # weights TensorRT combined with the ones set must be supplied too (get_missing_weights
                # docs); compute them from the tensors the slot holds
                partners = [n for n in self.refitter.get_missing_weights() if n and n not in tensors]
                if partners and not problems:
                    more = self._compute(partners, given, problems)
                    tensors.update(more)
                    if not problems:
                        self._set(more, set_names, problems)
                still = [n for n in self.refitter.get_missing_weights() if n]
                if still:
                    problems.append(f"TensorRT still reports missing weights {still[:10]}")
                if first:  # do not trust get_missing_weights() alone: every name of get_all_weights() is set
                    unset = sorted(set(self.required) - set(set_names))
                    if unset:
                        problems.append(f"weights never set: {unset[:10]}")
                if problems:
                    raise RefitError("TensorRT refit refused before refitting (engine unchanged):\n"
                                     + "\n".join(f"  - {p}" for p in problems))
                ok = self.refitter.refit_cuda_engine_async(self.refit_stream.cuda_stream)
            # the weights must stay alive until the enqueued refit ran, and serving must see them
            self.refit_stream.synchronize()
            if not ok:
                # Refitter docs: "If False is returned, a subset of weights may have been refitted."
                self.state.loaded = False
                self.state.current = {}
                errs = "; ".join(self.backend.errors()[-5:]) or "no message from TensorRT"
                raise RefitError(f"TensorRT refit_cuda_engine_async returned False ({errs}); the slot holds "
                                 "a partial weight set and will not serve until a complete refit succeeds")
        finally:
            for name in set_names:  # unset_named_weights docs: "Unset weights before releasing them."
                self.refitter.unset_named_weights(name)
            tensors.clear()
        self._commit(given)

    def _set(self, tensors: Mapping[str, torch.Tensor], set_names: list[str], problems: list[str]) -> None:
        for name, t in tensors.items():
            if not self.refitter.set_named_weights(name, self.backend.make_weights(t), self.backend.device_location):
                errs = "; ".join(self.backend.errors()[-3:])
                problems.append(f"engine weight {name!r}: TensorRT rejected it (set_named_weights returned False"
                                + (f": {errs})" if errs else ")"))
                return
            set_names.append(name)

    def _commit(self, given: Mapping[str, torch.Tensor]) -> None:
        for name, t in given.items():
            staged = self._staged.get(name)
            # keep the host tensor the device copy came from (no second device copy of the weights)
            self.state.current[name] = staged[0] if staged is not None and staged[1] is t else t
        self._staged = {}
        self.state.loaded = True
        self.state.refits += 1

    # ------------------------------------------------------------------ run
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.state.loaded:
            raise NotReadyError("tensorrt engine: this slot has no weights yet (a weight-stripped engine returns "
                                "zeros until its first refit)")
        with self._lock:
            return self.handle.run(inputs)

    def serialize_refittable(self) -> bytes:
        """The engine with its current weights, still refittable (TensorRT >= 10.14 INCLUDE_REFIT)."""
        if not self.state.loaded:
            raise NotReadyError("tensorrt engine: nothing to serialize before the first refit")
        with self._lock:
            return self.handle.serialize_refittable()

    def close(self) -> None:
        with self._lock:
            self.handle.close()
            self.state = _SlotState()


__all__ = ["EngineHandle", "RefitBackend", "RefitterLike", "StreamLike", "TensorRTSlot"]
