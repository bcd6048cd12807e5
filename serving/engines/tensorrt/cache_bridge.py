"""Our stripped-engine cache behind Torch-TensorRT's: the stricter key, the entry files, the bridge.

Torch-TensorRT looks engines up by its graph hash through a ``custom_engine_cache``
(:func:`make_torch_trt_cache`); :class:`CacheBridge` answers from ``serving.cache.EngineCache``
under a key that also names the TensorRT, Torch-TensorRT, torch and CUDA versions, the GPU and our
schemas (:func:`trt_key_fields`, keyed by :func:`trt_cache_key`). An entry holds Torch-TensorRT's packed blob,
the weight map as JSON, the stored constants and a checksum (:func:`trt_entry_files`,
:func:`read_trt_entry`), and is written only once its weight map is derived and verified
(:meth:`CacheBridge.commit`). The names say ``trt``: the generic cache-or-compile flow of the other
compiled engines (:mod:`serving.engines.cached_build`) is not used here, Torch-TensorRT drives the lookup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from serving.cache import cache_key
from serving.engines.tensorrt import mapping as tm
from serving.engines.tensorrt.environment import TrtEnvironment
from serving.engines.tensorrt.options import TrtBuildOptions
from serving.errors import CacheError, EngineBuildError
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, dtype_name

log = logging.getLogger(__name__)

#: bump when the layout of a cache entry changes (part of the cache key)
TRT_ENTRY_SCHEMA = 1

FILE_BLOB = "torch_trt_blob.bin"
FILE_MAP = "weight_map.json"
FILE_LITERALS = "literals.safetensors"
FILE_INFO = "hotswap_trt.json"

T = TypeVar("T")


def trt_key_fields(torch_trt_hash: str, env: TrtEnvironment, spec: BuildSpec,
                     options: TrtBuildOptions) -> dict[str, object]:
    """Everything a stripped engine depends on: stricter than Torch-TensorRT's own (graph) hash."""
    return {
        "schema": TRT_ENTRY_SCHEMA,
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


def trt_cache_key(fields: Mapping[str, object]) -> str:
    """``trt-`` + :func:`serving.cache.cache_key` of ``fields`` (sha256 of their canonical JSON)."""
    return "trt-" + cache_key(fields)


class EngineCacheLike(Protocol):
    """What this engine needs of ``serving.cache.EngineCache`` (the same signatures).

    ``load`` verifies the entry's checksums and calls ``loader(entry)`` on a hit (``None`` on a
    miss); ``store`` copies the named files into one new entry with its JSON metadata; ``remove``
    drops an entry. The cache counts its own hit/miss/store/corrupt/evict events.
    """

    def load(self, key: str, loader: Callable[[Any], T]) -> T | None: ...  # loader gets a CacheEntry

    def store(self, key: str, files: Mapping[str, Path], meta: Mapping[str, object]) -> object: ...

    def remove(self, key: str) -> object: ...


@dataclass(frozen=True)
class TrtEntry:
    """One stored stripped engine: Torch-TensorRT's packed blob, our weight map and stored constants."""

    blob: bytes
    weight_map: tm.WeightMap
    literals: Mapping[str, torch.Tensor]


def trt_entry_files(blob: bytes, weight_map: tm.WeightMap, literals: Mapping[str, torch.Tensor],
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


def read_trt_entry(directory: Path) -> TrtEntry:
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
    return TrtEntry(blob, wm, literals)


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
        self.hit: tuple[str, TrtEntry] | None = None  # (key, entry)
        self.staged: tuple[str, bytes] | None = None  # (torch-trt hash, blob)
        self._missed: set[str] = set()

    def load(self, torch_trt_hash: str) -> bytes | None:
        if self.cache is None:
            return None
        key = trt_cache_key(self.key_for(torch_trt_hash))
        if key in self._missed:  # Torch-TensorRT looks up twice on a miss (pull, then insert)
            return None
        try:
            entry = self.cache.load(key, lambda stored: read_trt_entry(stored.path))
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
        key = trt_cache_key(fields)
        if self.cache is None:
            return None
        meta = json.loads(json.dumps({"engine": "tensorrt", **{k: v for k, v in fields.items() if k != "inputs"}},
                                     default=str))
        with tempfile.TemporaryDirectory(prefix="hotswap-trt-") as tmp:
            paths = {}
            for name, data in trt_entry_files(self.staged[1], weight_map, literals, fields).items():
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


__all__ = [
    "CacheBridge", "EngineCacheLike", "FILE_BLOB", "FILE_INFO", "FILE_LITERALS", "FILE_MAP", "TRT_ENTRY_SCHEMA",
    "TrtEntry", "make_torch_trt_cache", "read_trt_entry", "trt_cache_key", "trt_entry_files", "trt_key_fields",
]
