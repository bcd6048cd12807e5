"""TensorRT engine: weight-stripped, refittable engines from Torch-TensorRT, refitted in place.

Build (:meth:`TensorRTEngine.build`)
    The model is exported with a dynamic batch dimension and converted as one whole graph by
    Torch-TensorRT's ``convert_exported_program_to_serialized_trt_engine`` with
    ``immutable_weights=False`` (``BuilderFlag.REFIT``, never ``REFIT_IDENTICAL``) and
    ``strip_engine_weights=True`` (``BuilderFlag.STRIP_PLAN``). Our stripped-engine cache plugs in
    as its ``custom_engine_cache`` (a ``BaseEngineCache`` with ``save``/``load``); entries are keyed
    by Torch-TensorRT's graph hash *and* the TensorRT, Torch-TensorRT and torch versions, the GPU and
    our schema (:func:`cache_key_fields`). Each entry also holds the exact weight map
    (:mod:`serving.engines.trt_mapping`) as JSON.

Refit (:class:`TensorRTSlot`)
    A slot is one deserialized engine, its execution context and a ``trt.Refitter``. Weights go in as
    CUDA tensors (``TensorLocation.DEVICE``) through ``refit_cuda_engine_async`` on the slot's own
    refit stream, after the slot's inference stream has drained. Every name of
    ``Refitter.get_all_weights()`` is set on a slot's first refit, and every problem is found before
    TensorRT is touched. A slot never runs before its first successful refit (a stripped engine
    returns zeros). Double buffering = two slots = two engines and contexts.

Nothing here imports ``tensorrt`` or ``torch_tensorrt`` at module level: without them,
``TensorRTEngine.build`` raises :class:`~serving.errors.EngineUnavailableError` saying what is
missing and how to install it. TensorRT calls follow the Python API docstrings of
``tensorrt.Refitter`` (TensorRT 10.x/11.x); Torch-TensorRT calls follow its sources 2.10-2.14
(``py/torch_tensorrt/dynamo/``: ``_compiler.py``, ``_refit.py``, ``_engine_cache.py``,
``conversion/_conversion.py``, ``conversion/_TRTInterpreter.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch

from serving.engines import trt_mapping as tm
from serving.engines.base import BuildInfo, Engine, WeightSlot
from serving.engines.export import export, make_module
from serving.errors import (
    CacheError,
    ConfigError,
    EngineBuildError,
    EngineUnavailableError,
    HotswapError,
    NotReadyError,
    RefitError,
)
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, WeightSpec, dtype_name

if TYPE_CHECKING:  # type checking only: at run time TensorRT is imported inside functions
    import tensorrt as trt

log = logging.getLogger(__name__)

#: TensorRT 10.14 added ``SerializationFlag.INCLUDE_REFIT``: without it a refitted engine that is
#: serialized again is no longer refittable, so only a single refit would be possible.
MIN_TENSORRT = (10, 14)
#: first Torch-TensorRT that caches stripped engines and keeps refitted ones refittable (INCLUDE_REFIT)
MIN_TORCH_TENSORRT = (2, 10)
#: bump when the layout of a cache entry changes (part of the cache key)
CACHE_SCHEMA = 1

INSTALL_HINT = (
    "Install it inside an NGC Triton container whose TensorRT is >= 10.14 "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or -trtllm-python-py3; docs/tensorrt.md lists the pairs) "
    "with: pip install 'trt-hotswap[tensorrt]' (torch-tensorrt must match the container's torch). "
    "Or choose engine 'aoti' or 'eager', which need no TensorRT."
)

FILE_BLOB = "torch_trt_blob.bin"
FILE_MAP = "weight_map.json"
FILE_LITERALS = "literals.safetensors"
FILE_INFO = "hotswap_trt.json"


# =========================================================================== availability
def parse_version(text: str) -> tuple[int, ...]:
    """``"10.14.1.48.post1"`` -> ``(10, 14, 1, 48)``; ``"2.13.0+cu130"`` -> ``(2, 13, 0)``."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def unavailable_message(problems: Sequence[str]) -> str:
    """The one message shown when ``engine: tensorrt`` cannot run here."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"engine 'tensorrt' is not available on this machine:\n{lines}\n{INSTALL_HINT}"


@dataclass(frozen=True)
class TrtEnvironment:
    """Versions and GPU an engine is built for (all of it goes into the cache key)."""

    tensorrt: str
    torch_tensorrt: str
    torch: str
    cuda: str
    device_name: str
    compute_capability: str


def probe_environment(device: torch.device) -> TrtEnvironment:
    """Check TensorRT, Torch-TensorRT and CUDA; raise one :class:`EngineUnavailableError` naming every gap."""
    problems: list[str] = []
    trt_version = tt_version = ""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        problems.append(f"the TensorRT Python package cannot be imported ({type(e).__name__}: {e})")
        trt = None
    if trt is not None:
        version = getattr(trt, "__version__", None)
        if not isinstance(version, str) or not hasattr(trt, "Refitter"):
            where = [str(p) for p in getattr(trt, "__path__", [])] or [str(getattr(trt, "__file__", "?"))]
            problems.append(f"'import tensorrt' finds only {where}, not the TensorRT runtime (type stubs such "
                            "as tensorrt-stubs install an empty 'tensorrt' package)")
        else:
            trt_version = version
            flags = getattr(trt, "SerializationFlag", None)
            if parse_version(version) < MIN_TENSORRT or not hasattr(flags, "INCLUDE_REFIT"):
                problems.append(f"TensorRT {version} is too old: hotswap needs >= "
                                f"{'.'.join(map(str, MIN_TENSORRT))} (SerializationFlag.INCLUDE_REFIT keeps a "
                                "refitted engine refittable; older TensorRT would allow a single refit)")
    if problems:  # importing torch_tensorrt without TensorRT fails deep inside; only say whether it is there
        if importlib.util.find_spec("torch_tensorrt") is None:
            problems.append("Torch-TensorRT (torch_tensorrt) is not installed")
    else:
        try:
            torch_trt = importlib.import_module("torch_tensorrt")
            tt_version = str(getattr(torch_trt, "__version__", "0"))
        except Exception as e:
            problems.append(f"Torch-TensorRT cannot be imported ({type(e).__name__}: {e})")
        else:
            if parse_version(tt_version) < MIN_TORCH_TENSORRT:
                problems.append(f"Torch-TensorRT {tt_version} is too old: hotswap needs >= "
                                f"{'.'.join(map(str, MIN_TORCH_TENSORRT))}")
    if device.type != "cuda":
        problems.append(f"device {str(device)!r} is not a CUDA device; set device 'cuda' for the tensorrt engine")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    if problems:
        raise EngineUnavailableError(unavailable_message(problems))
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return TrtEnvironment(trt_version, tt_version, torch.__version__, str(torch.version.cuda),
                          torch.cuda.get_device_name(index), f"{major}.{minor}")


# =========================================================================== cache key
@dataclass(frozen=True)
class TrtBuildOptions:
    """Settings of a TensorRT build and of its refits (from ``BuildSpec.options``)."""

    weights_validation: bool = True  # Refitter.weights_validation
    max_threads: int = 0  # Refitter.max_threads; 0 keeps TensorRT's default
    optimization_level: int | None = None
    workspace_size: int = 0
    verify_seed: int = 0

    @classmethod
    def from_spec(cls, spec: BuildSpec) -> TrtBuildOptions:
        def num(key: str, default: int | None) -> int | None:
            v = spec.option(key, default)
            if v is None:
                return None
            try:
                return int(str(v))
            except ValueError as e:
                raise ConfigError(f"option {key}={v!r} is not an integer") from e

        validation = str(spec.option("trt_weights_validation", "true")).strip().lower()
        if validation not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"option trt_weights_validation={validation!r}: use true or false")
        max_threads = num("trt_refit_max_threads", 0) or 0
        if max_threads < 0:
            raise ConfigError(f"option trt_refit_max_threads={max_threads} must be >= 0")
        return cls(
            weights_validation=validation in ("true", "1", "yes"),
            max_threads=max_threads,
            optimization_level=num("trt_optimization_level", None),
            workspace_size=num("trt_workspace_size", 0) or 0,
            verify_seed=num("trt_verify_seed", 0) or 0,
        )


def cache_key_fields(torch_trt_hash: str, env: TrtEnvironment, spec: BuildSpec,
                     options: TrtBuildOptions) -> dict[str, object]:
    """Everything a stripped engine depends on: stricter than Torch-TensorRT's own (graph) hash."""
    return {
        "schema": CACHE_SCHEMA,
        "mapping_schema": tm.MAPPING_SCHEMA,
        "torch_trt_hash": torch_trt_hash,
        "tensorrt": env.tensorrt,
        "torch_tensorrt": env.torch_tensorrt,
        "torch": env.torch,
        "cuda": env.cuda,
        "gpu": env.device_name,
        "compute_capability": env.compute_capability,
        "dtype": dtype_name(spec.dtype),
        "max_batch": spec.max_batch,
        "inputs": [s.to_json() for s in spec.inputs],
        "optimization_level": options.optimization_level,
        "workspace_size": options.workspace_size,
    }


def cache_key(fields: Mapping[str, object]) -> str:
    """``trt-`` + sha256 of the canonical JSON of ``fields``."""
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return "trt-" + hashlib.sha256(canon.encode()).hexdigest()


# =========================================================================== our cache behind Torch-TRT's
T = TypeVar("T")


class EngineCacheLike(Protocol):
    """What this engine needs of ``serving.cache.EngineCache`` (the same signatures).

    ``load`` verifies the entry's checksums and calls ``loader(entry)`` on a hit (``None`` on a
    miss); ``store`` copies the named files into one new entry with its JSON metadata; ``remove``
    drops an entry. The cache counts its own hit/miss/store/corrupt/evict events.
    """

    def load(self, key: str, loader: Callable[[Any], T]) -> T | None: ...  # loader gets a CacheEntry

    def store(self, key: str, files: Mapping[str, Path], meta: Mapping[str, object]) -> object: ...

    def remove(self, key: str) -> None: ...


@dataclass(frozen=True)
class CacheEntry:
    """One stored stripped engine: Torch-TensorRT's packed blob, our weight map and stored constants."""

    blob: bytes
    weight_map: tm.WeightMap
    literals: Mapping[str, torch.Tensor]


def entry_files(blob: bytes, weight_map: tm.WeightMap, literals: Mapping[str, torch.Tensor],
                fields: Mapping[str, object]) -> dict[str, bytes]:
    """The files of a cache entry (pure)."""
    from safetensors.torch import save

    info = {"fields": dict(fields), "blob_sha256": hashlib.sha256(blob).hexdigest(), "blob_bytes": len(blob)}
    return {
        FILE_BLOB: blob,
        FILE_MAP: json.dumps(weight_map.to_json(), indent=1, sort_keys=True).encode(),
        FILE_LITERALS: save({k: v.detach().cpu().contiguous() for k, v in literals.items()}),
        FILE_INFO: json.dumps(info, indent=1, sort_keys=True, default=str).encode(),
    }


def read_entry(directory: Path) -> CacheEntry:
    """Read and check an entry; :class:`CacheError` naming the file for anything wrong."""
    from safetensors.torch import load

    try:
        blob = (directory / FILE_BLOB).read_bytes()
        info = json.loads((directory / FILE_INFO).read_text())
        wm = tm.WeightMap.from_json(json.loads((directory / FILE_MAP).read_text()))
        literals = load((directory / FILE_LITERALS).read_bytes())
    except (OSError, ValueError, tm.MappingError) as e:  # JSONDecodeError and safetensors errors are ValueErrors
        raise CacheError(f"stripped-engine cache entry {directory}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(info, dict) or info.get("blob_sha256") != hashlib.sha256(blob).hexdigest():
        raise CacheError(f"stripped-engine cache entry {directory}: {FILE_BLOB} does not match its checksum "
                         f"in {FILE_INFO} (truncated or modified); it will be rebuilt")
    missing = sorted(set(wm.literal_keys) - set(literals))
    if missing:
        raise CacheError(f"stripped-engine cache entry {directory}: {FILE_LITERALS} lacks {missing}")
    return CacheEntry(blob, wm, literals)


class CacheBridge:
    """Torch-TensorRT's ``save``/``load`` calls, mapped onto our cache with the stricter key.

    ``load`` answers Torch-TensorRT's lookup (by its graph hash); ``save`` only stages the blob: the
    entry is written by :meth:`commit` once the weight map is derived and verified, so an entry
    never exists without its map.
    """

    def __init__(self, cache: EngineCacheLike | None, key_for: Callable[[str], Mapping[str, object]],
                 metrics: HotswapMetrics) -> None:
        self.cache = cache
        self.key_for = key_for
        self.metrics = metrics
        self.hit: tuple[str, CacheEntry] | None = None  # (key, entry)
        self.staged: tuple[str, bytes] | None = None  # (torch-trt hash, blob)
        self._missed: set[str] = set()

    def load(self, torch_trt_hash: str) -> bytes | None:
        if self.cache is None:
            return None
        key = cache_key(self.key_for(torch_trt_hash))
        if key in self._missed:  # Torch-TensorRT looks up twice on a miss (pull, then insert)
            return None
        try:
            entry = self.cache.load(key, lambda stored: read_entry(stored.path))
        except CacheError as e:  # checksums fine, content unusable: drop it so it is rebuilt
            log.warning("%s", e)
            self.metrics.cache_event("corrupt")
            self.cache.remove(key)
            entry = None
        if entry is None:
            self._missed.add(key)
            return None
        self.hit = (key, entry)
        return entry.blob

    def save(self, torch_trt_hash: str, blob: bytes) -> None:
        self.staged = (torch_trt_hash, bytes(blob))

    def commit(self, weight_map: tm.WeightMap, literals: Mapping[str, torch.Tensor]) -> str | None:
        """Write the staged engine with its map; returns the key (``None`` without a cache)."""
        if self.staged is None:
            raise EngineBuildError("Torch-TensorRT did not hand the built engine to the cache (save was never "
                                   "called); is its refit feature available (ENABLED_FEATURES.refit)?")
        fields = self.key_for(self.staged[0])
        key = cache_key(fields)
        if self.cache is None:
            return None
        meta = json.loads(json.dumps({"engine": "tensorrt", **{k: v for k, v in fields.items() if k != "inputs"}},
                                     default=str))
        with tempfile.TemporaryDirectory(prefix="hotswap-trt-") as tmp:
            paths = {}
            for name, data in entry_files(self.staged[1], weight_map, literals, fields).items():
                paths[name] = Path(tmp) / name
                paths[name].write_bytes(data)
            self.cache.store(key, paths, meta)
        return key


def make_torch_trt_cache(bridge: CacheBridge) -> Any:
    """A ``torch_tensorrt.dynamo._engine_cache.BaseEngineCache`` whose ``save``/``load`` go to ``bridge``.

    ``BaseEngineCache`` declares abstract ``__init__``, ``save(hash, blob, *args, **kwargs)`` and
    ``load(hash, *args, **kwargs) -> Optional[bytes]``; ``insert``/``check`` pack and unpack around
    them (``dynamo/_engine_cache.py``).
    """
    from torch_tensorrt.dynamo._engine_cache import BaseEngineCache

    class HotswapEngineCache(BaseEngineCache):
        def __init__(self, bridge: CacheBridge) -> None:
            self.bridge = bridge

        def save(self, hash: str, blob: bytes, *args: Any, **kwargs: Any) -> None:
            self.bridge.save(hash, blob)

        def load(self, hash: str, *args: Any, **kwargs: Any) -> bytes | None:
            return self.bridge.load(hash)

    return HotswapEngineCache(bridge)


# =========================================================================== TensorRT <-> torch dtypes
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


# =========================================================================== slot and its seams
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


# =========================================================================== real TensorRT pieces
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


class _TrtBackend:
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


class _TrtHandle:
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


# =========================================================================== Torch-TensorRT build path
def _compile_options(device: torch.device, options: TrtBuildOptions) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "immutable_weights": False,  # BuilderFlag.REFIT (_TRTInterpreter._populate_trt_builder_config)
        "refit_identical_engine_weights": False,  # never REFIT_IDENTICAL: other weights are undefined
        "strip_engine_weights": True,  # BuilderFlag.STRIP_PLAN
        "cache_built_engines": True,
        "reuse_cached_engines": True,
        "min_block_size": 1,
        "require_full_compilation": True,
        "offload_module_to_cpu": False,
    }
    if options.optimization_level is not None:
        opts["optimization_level"] = options.optimization_level
    if options.workspace_size:
        opts["workspace_size"] = options.workspace_size
    return opts


def _settings(device: torch.device, options: TrtBuildOptions) -> Any:
    """The ``CompilationSettings`` ``convert_exported_program_to_serialized_trt_engine`` builds from
    the same options (``dynamo/_compiler.py``)."""
    from torch_tensorrt.dynamo._settings import CompilationSettings
    from torch_tensorrt.dynamo.utils import to_torch_tensorrt_device

    return CompilationSettings(device=to_torch_tensorrt_device(device), **_compile_options(device, options))


def _lower(ep: torch.export.ExportedProgram, settings: Any, annotate: Sequence[str] | None) -> torch.fx.GraphModule:
    """The lowering of ``convert_exported_program_to_serialized_trt_engine`` (``dynamo/_compiler.py``):
    ``pre_export_lowering``, ``run_decompositions(get_decompositions(...))``, ``module()``,
    ``post_lowering``; with our annotation of folded constants before ``post_lowering``."""
    from torch_tensorrt.dynamo.lowering import post_lowering, pre_export_lowering
    from torch_tensorrt.dynamo.lowering._decompositions import get_decompositions

    # annotated "-> torch.fx.GraphModule" up to 2.13 but returns the ExportedProgram (2.14 fixes the hint)
    ep = cast(torch.export.ExportedProgram, pre_export_lowering(ep, settings))
    # get_decompositions' parameters differ between releases; they are all settings fields
    params = inspect.signature(get_decompositions).parameters
    decomp_kwargs = {p: getattr(settings, p) for p in params if hasattr(settings, p)}
    ep = ep.run_decompositions(get_decompositions(**decomp_kwargs))
    gm = ep.module()
    if annotate is not None:
        tm.annotate_constant_exprs(gm, annotate)
    lowered: torch.fx.GraphModule = post_lowering(gm, settings)
    return lowered


def _network_weights(gm: torch.fx.GraphModule, inputs: Sequence[Any], settings: Any
                     ) -> tuple[dict[str, torch.Tensor], list[tuple[Any, Any]]]:
    """Torch-TensorRT's weight bookkeeping for ``gm``, as ``construct_refit_mapping`` (``dynamo/_refit.py``)
    gets it: a ``TRTInterpreter``, ``_construct_trt_network_def()``, ``ctx.weight_refit_map``; plus the
    tensors its ``get_attr`` returned, for provenance by identity."""
    from torch_tensorrt.dynamo.conversion._conversion import infer_module_output_dtypes
    from torch_tensorrt.dynamo.conversion._TRTInterpreter import TRTInterpreter

    class RecordingInterpreter(TRTInterpreter):
        attrs: list[tuple[Any, Any]]

        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if n.op == "get_attr":
                self.attrs.append((n, result))
            return result

    interpreter = RecordingInterpreter(
        gm, inputs, output_dtypes=infer_module_output_dtypes(gm, truncate_double=settings.truncate_double),
        compilation_settings=settings)
    interpreter.attrs = []
    interpreter._construct_trt_network_def()
    return dict(interpreter.ctx.weight_refit_map), interpreter.attrs


def _read_sources(module: torch.nn.Module) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=False).items()}


def _graph_reads(ep: torch.export.ExportedProgram) -> set[str]:
    """State-dict names the exported graph actually uses (a placeholder with users)."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return {lifted[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in lifted and n.users}


@dataclass(frozen=True)
class _Built:
    serialized_engine: bytes
    input_names: list[str]
    output_names: list[str]
    weight_map: tm.WeightMap
    literals: Mapping[str, torch.Tensor]
    cache: str
    key: str | None


class TensorRTEngine(Engine):
    """A weight-stripped, refittable TensorRT engine; each slot deserializes it once more."""

    kind = "tensorrt"

    def __init__(self, *, device: torch.device, build_info: BuildInfo, serialized_engine: bytes,
                 input_names: Sequence[str], output_names: Sequence[str], weight_map: tm.WeightMap,
                 literals: Mapping[str, torch.Tensor], options: TrtBuildOptions) -> None:
        super().__init__(device, build_info)
        import tensorrt as trt

        self.serialized_engine = serialized_engine
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.weight_map = weight_map
        self.options = options
        self.literals = {k: v.to(device) for k, v in literals.items()}
        self.ignored_names = frozenset(weight_map.ignored)
        self.logger, self.messages = make_logger()
        self.runtime = trt.Runtime(self.logger)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCacheLike | None = None,
              metrics: HotswapMetrics | None = None) -> TensorRTEngine:
        """Convert (or load from the cache) and verify; :class:`EngineUnavailableError` without TensorRT."""
        t0 = time.perf_counter()
        device = torch.device(spec.device)
        env = probe_environment(device)  # raises before anything else is imported
        options = TrtBuildOptions.from_spec(spec)
        metrics = metrics or HotswapMetrics()
        built = _build(spec, device, env, options, cache, metrics)
        info = BuildInfo(built.cache, time.perf_counter() - t0, built.key,
                         f"TensorRT {env.tensorrt}, Torch-TensorRT {env.torch_tensorrt}, {env.device_name} "
                         f"(sm {env.compute_capability}); stripped engine {len(built.serialized_engine)} bytes, "
                         f"{len(built.weight_map.records)} refittable weights, "
                         f"{len(built.weight_map.literal_keys)} stored constants")
        return cls(device=device, build_info=info, serialized_engine=built.serialized_engine,
                   input_names=built.input_names, output_names=built.output_names,
                   weight_map=built.weight_map, literals=built.literals, options=options)

    # ------------------------------------------------------------------ Engine
    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self.weight_map.sources

    def new_slot(self) -> TensorRTSlot:
        """A second engine and context from the stripped plan: no weights until its first refit."""
        return self.slot_from_serialized(self.serialized_engine, has_weights=False)

    def slot_from_serialized(self, data: bytes, *, has_weights: bool) -> TensorRTSlot:
        """A slot from a serialized engine: the stripped plan, or one from :meth:`TensorRTSlot.serialize_refittable`.

        With ``has_weights`` the slot serves at once; its next refit must still provide every tensor
        (the slot does not know which checkpoint the weights came from).
        """
        import tensorrt as trt

        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineBuildError("TensorRT could not deserialize the engine: "
                                   + ("; ".join(self.messages[-3:]) or "no message"))
        refit_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        infer_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        handle = _TrtHandle(engine, self.input_names, self.output_names, self.device, infer_stream)
        refitter = trt.Refitter(engine, self.logger)
        return TensorRTSlot(weight_map=self.weight_map, literals=self.literals, refitter=refitter,
                            backend=_TrtBackend(self.messages), handle=handle,
                            refit_stream=refit_stream, infer_stream=infer_stream, device=self.device,
                            options=self.options, preloaded=has_weights)


def _trt_inputs(spec: BuildSpec) -> list[Any]:
    from torch_tensorrt._Input import Input

    opt = min(max(1, spec.max_batch // 2), spec.max_batch)
    return [Input(min_shape=(1, *s.shape), opt_shape=(opt, *s.shape),
                                 max_shape=(spec.max_batch, *s.shape), dtype=s.dtype) for s in spec.inputs]


def _build(spec: BuildSpec, device: torch.device, env: TrtEnvironment, options: TrtBuildOptions,
           cache: EngineCacheLike | None, metrics: HotswapMetrics) -> _Built:
    from torch_tensorrt.dynamo._compiler import convert_exported_program_to_serialized_trt_engine
    from torch_tensorrt.dynamo._engine_cache import BaseEngineCache

    module = make_module(spec, device)
    bridge = CacheBridge(cache, lambda h: cache_key_fields(h, env, spec, options), metrics)
    trt_inputs = _trt_inputs(spec)
    try:
        serialized = convert_exported_program_to_serialized_trt_engine(
            export(module, spec, device), arg_inputs=trt_inputs, device=device,
            custom_engine_cache=make_torch_trt_cache(bridge), **_compile_options(device, options))
    except HotswapError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        raise EngineBuildError(
            f"Torch-TensorRT could not convert {spec.factory} as one TensorRT engine ({type(e).__name__}: {e}; "
            f"cause: {type(cause).__name__}: {cause}). hotswap converts the whole graph; an operator "
            "without a TensorRT converter must be rewritten, or use engine 'aoti'.") from e
    if bridge.hit is not None:
        key, entry = bridge.hit
        blob, weight_map, literals, how = entry.blob, entry.weight_map, entry.literals, "hit"
    else:
        if bridge.staged is None:
            raise EngineBuildError("Torch-TensorRT did not pass the built engine to the cache (save was never "
                                   "called); is its refit feature available (ENABLED_FEATURES.refit)?")
        blob = bridge.staged[1]
        how, key = "miss", None
    # BaseEngineCache.unpack -> (serialized_engine, input_names, output_names, input_specs, settings,
    # requires_output_allocator[, requires_native_multidevice])  (dynamo/_engine_cache.py)
    unpacked = BaseEngineCache.unpack(blob)
    stripped, input_names, output_names, requires_output_allocator = (
        bytes(unpacked[0]), list(unpacked[1]), list(unpacked[2]), bool(unpacked[5]))
    if requires_output_allocator:
        raise EngineBuildError(f"{spec.factory} has data-dependent output shapes (needs an output allocator); "
                               "the tensorrt engine does not serve those")
    if bridge.hit is None:
        weight_map, literals = _derive_and_verify(spec, device, options, stripped, trt_inputs)
        key = bridge.commit(weight_map, literals)
    del serialized
    return _Built(stripped, input_names, output_names, weight_map, literals, how, key)


def _engine_weight_names(stripped: bytes) -> list[str]:
    import tensorrt as trt

    logger, messages = make_logger()
    engine = trt.Runtime(logger).deserialize_cuda_engine(stripped)
    if engine is None:
        raise EngineBuildError("TensorRT could not deserialize the engine it just built: "
                               + ("; ".join(messages[-3:]) or "no message"))
    names = list(trt.Refitter(engine, logger).get_all_weights())
    del engine
    return names


def _derive_and_verify(spec: BuildSpec, device: torch.device, options: TrtBuildOptions, stripped: bytes,
                       trt_inputs: Sequence[Any]) -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
    """The exact weight map of a freshly built engine, checked against Torch-TensorRT for other weights."""
    settings = _settings(device, options)
    names = _engine_weight_names(stripped)
    module = make_module(spec, device)
    specs = _read_sources(module)
    ep = export(module, spec, device)
    reads = _graph_reads(ep)
    gm = _lower(ep, settings, annotate=list(specs))
    refit_map, attrs = _network_weights(gm, trt_inputs, settings)
    attr_tensors = [(t, tm.node_expr(n, specs)) for n, t in attrs if isinstance(t, torch.Tensor)]
    derivation = tm.derive_records(refit_map, names, attr_tensors, tm.batch_norm_nodes(gm, specs), specs)
    problems = list(derivation.problems)
    used = set().union(*(r.sources for r in derivation.records)) if derivation.records else set()
    baked = sorted((reads & set(specs)) - used)  # non-persistent buffers are not checkpoint tensors
    if baked:
        problems.append(f"the model reads {baked[:10]} but no refittable engine weight comes from them: "
                        "the engine would bake them in")
    build_sources = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    problems += tm.compare_records(derivation.records, build_sources, derivation.literals, refit_map)
    if not problems:
        # an independent weight set through Torch-TensorRT's own path must give what the records give
        random = tm.random_sources(specs, seed=options.verify_seed)
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if k in random:
                    v.copy_(random[k].to(v.device))
        gm2 = _lower(export(module, spec, device), settings, annotate=None)
        refit_map2, _ = _network_weights(gm2, trt_inputs, settings)
        problems += tm.compare_records(derivation.records, {**build_sources, **random}, derivation.literals,
                                       refit_map2)
    if problems:
        raise EngineBuildError(f"cannot map every refittable weight of the {spec.factory} engine to the "
                               "checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    weight_map = tm.WeightMap(derivation.records, {k: specs[k] for k in sorted(used)},
                              tuple(sorted(set(specs) - used)), tuple(sorted(derivation.literals)))
    return weight_map, dict(derivation.literals)


def engine_nbytes_fraction(serialized_engine: bytes, specs: Mapping[str, WeightSpec]) -> float:
    """Size of a serialized engine relative to the bytes of the weights it reads (stripped: small)."""
    total = sum(s.nbytes for s in specs.values())
    return len(serialized_engine) / total if total else math.inf


__all__ = [
    "CACHE_SCHEMA", "CacheBridge", "CacheEntry", "EngineCacheLike", "INSTALL_HINT", "MIN_TENSORRT",
    "MIN_TORCH_TENSORRT", "RefitBackend", "RefitterLike", "StreamLike", "TensorRTEngine", "TensorRTSlot",
    "TrtBuildOptions", "TrtEnvironment", "cache_key", "cache_key_fields", "engine_nbytes_fraction",
    "entry_files", "parse_version", "probe_environment", "read_entry", "trt_dtype_to_torch",
    "torch_dtype_to_trt_name", "unavailable_message",
]
