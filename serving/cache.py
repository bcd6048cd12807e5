"""The stripped-engine cache: compiled engines stored without weights.

An entry is a folder ``root/<key>`` holding the payload files (e.g. an AOTInductor ``.pt2``
compiled with its constants left out) and ``meta.json``. The key is weight-agnostic but
otherwise strict: it covers the architecture (:func:`graph_fingerprint`), the input specs,
the batch range, the model dtype, the engine's build flags, the torch version and the device
(:func:`cache_key_fields`), so a new checkpoint of the same model reuses the entry and nothing
else does.

Writers hold the cache's file lock while they copy into a temp folder inside ``root`` and
rename it to ``root/<key>`` (atomic on POSIX), so an entry is either complete or absent; a temp
folder seen while holding the lock can only be the leftover of a crashed writer and is removed.
Readers verify every payload file's sha256 before the loader sees it. Metadata is JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import filelock
import torch

from serving.errors import CacheError
from serving.hashing import sha256_file
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, dtype_name

log = logging.getLogger(__name__)

#: bump when the key fields or the entry layout change; old entries then simply miss
CACHE_SCHEMA_VERSION = 1

META_FILE = "meta.json"
#: reserved top-level key of meta.json holding the cache's own bookkeeping
CACHE_META_KEY = "_cache"
_TMP_PREFIX = ".tmp-"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CHUNK = 1 << 20

T = TypeVar("T")


# --------------------------------------------------------------------------- key


def _jsonable(value: object) -> object:
    """A canonical JSON-compatible copy (dict keys sorted; non-JSON leaves by ``repr``)."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _is_torch_module(module_name: str) -> bool:
    return module_name == "torch" or module_name.startswith("torch.") or module_name == "builtins"


def _source_digest(module_name: str) -> str:
    """sha256 of a module's source file, or a marker when it has none (REPL, C extension)."""
    mod = sys.modules.get(module_name)
    if mod is None:
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            return "<not importable>"
    try:
        src = inspect.getsourcefile(mod)
    except TypeError:
        src = None
    if not src or not os.path.isfile(src):
        return "<no source>"
    return sha256_file(Path(src))


_PLAIN = (bool, int, float, str, type(None))


def _plain_attrs(module: torch.nn.Module) -> dict[str, object]:
    """Public scalar attributes (``n_heads``, ``eps``, ...): hyperparameters that repr may not show."""
    out: dict[str, object] = {}
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
            out[k] = v
    return out


def graph_fingerprint(module: torch.nn.Module, factory: str, factory_kwargs: Mapping[str, object]) -> str:
    """A weight-agnostic fingerprint of the architecture of ``module``.

    Covers the factory path and kwargs, ``repr(module)``, the public scalar attributes of every
    submodule (``n_heads``, ``eps``), the state-dict specs (names, shapes, dtypes; never values)
    and the sha256 of the source files of the factory's module and of every
    non-torch class (with its non-torch bases) in ``module.modules()``. Helpers that these sources
    import from other files are not hashed: a change there needs a change of the factory kwargs or
    of :data:`CACHE_SCHEMA_VERSION` (or a cleared cache). Classes without a source file (defined in
    a REPL) are fingerprinted by name only.
    """
    module_names = {factory.partition(":")[0]}
    classes: set[str] = set()
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if _is_torch_module(cls.__module__) or cls is object:
                continue
            classes.add(f"{cls.__module__}.{cls.__qualname__}")
            module_names.add(cls.__module__)
    doc = {
        "factory": factory,
        "kwargs": _jsonable(dict(factory_kwargs)),
        "repr": repr(module),
        "attrs": [[name, _plain_attrs(sub)] for name, sub in module.named_modules()],
        "classes": sorted(classes),
        "state": [[name, list(t.shape), dtype_name(t.dtype)] for name, t in module.state_dict().items()],
        "sources": {name: _source_digest(name) for name in sorted(module_names) if name},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _device_fields(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {"type": device.type, "arch": "cpu" if device.type == "cpu" else device.type}
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "type": "cuda",
        "arch": f"sm_{major}{minor}",
        "name": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
    }


def cache_key_fields(
    *,
    engine: str,
    graph: str,
    spec: BuildSpec,
    build_flags: Mapping[str, object],
    device: torch.device,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Everything an engine build depends on apart from the weights, as JSON-compatible data.

    Pure apart from asking torch about the GPU when ``device`` is CUDA. The device index is left
    out on purpose: an engine serves on any GPU of the same architecture.
    """
    return {
        "schema": CACHE_SCHEMA_VERSION,
        "engine": engine,
        "build_flags": _jsonable(dict(build_flags)),
        "graph": graph,
        "inputs": [i.to_json() for i in spec.inputs],
        "batch": {"min": 1, "max": spec.max_batch},
        "dtype": dtype_name(spec.dtype),
        "torch": torch.__version__,
        "device": _device_fields(device),
        "extra": _jsonable(dict(extra or {})),
    }


def cache_key(fields: Mapping[str, object]) -> str:
    """sha256 hex digest of the canonical JSON of ``fields``."""
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CacheError(f"cache key fields are not plain JSON data: {e}") from e
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class CacheEntry:
    """One verified (on load) or listed (by :meth:`EngineCache.entries`) cache entry.

    ``meta`` is the whole ``meta.json``: the caller's keys at the top level plus the cache's own
    bookkeeping under ``"_cache"`` (key, schema, created time, per-file sha256 and size).
    ``size`` counts the payload files and ``meta.json``. ``last_used`` is the LRU timestamp.
    """

    key: str
    path: Path
    files: Mapping[str, Path]
    meta: Mapping[str, object]
    size: int
    last_used: float = 0.0


class _Corrupt(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EngineCache:
    """A folder of stripped engines, safe for several processes (``filelock`` on ``root/.lock``).

    ``max_bytes`` bounds the total size; least-recently-used entries go first. ``lock_timeout``
    (seconds) bounds the wait for another process; loaders run under the lock, so keep them short.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_bytes: int = 8 << 30,
        metrics: HotswapMetrics | None = None,
        lock_timeout: float = 120.0,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.metrics = metrics if metrics is not None else HotswapMetrics()
        self.lock_timeout = lock_timeout
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"engine cache: cannot create the folder {self.root}: {e}") from e
        self._lock_path = self.root / ".lock"
        self._lock = filelock.FileLock(str(self._lock_path), timeout=lock_timeout)

    # -- locking -----------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except filelock.Timeout as e:
            raise CacheError(
                f"engine cache {self.root}: could not take the lock {self._lock_path} within "
                f"{self.lock_timeout:g}s; another process holds it. Wait for it, raise lock_timeout, or "
                "build without the cache"
            ) from e
        try:
            yield
        finally:
            self._lock.release()

    # -- reading -----------------------------------------------------------------

    def _check_key(self, key: str) -> None:
        if not _KEY_RE.match(key):
            raise CacheError(f"engine cache: invalid key {key!r}; expected letters, digits, '_', '.', '-'")

    def _read(self, path: Path, *, verify: bool) -> CacheEntry:
        """Parse an entry folder; with ``verify`` also check every payload file's sha256."""
        meta_path = path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            own = meta[CACHE_META_KEY]
            files_meta = own["files"]
            if own["key"] != path.name or not isinstance(files_meta, dict):
                raise _Corrupt(f"meta.json names key {own['key']!r}, not {path.name!r}")
            last_used = meta_path.stat().st_mtime
        except _Corrupt:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _Corrupt(f"cannot read {meta_path}: {e}") from e
        files: dict[str, Path] = {}
        size = meta_path.stat().st_size
        problems: list[str] = []
        for name, info in files_meta.items():
            fpath = path / name
            if not isinstance(info, dict) or not _FILE_RE.match(name):
                problems.append(f"{meta_path}: bad file record {name!r}")
                continue
            try:
                actual = fpath.stat().st_size
            except OSError:
                problems.append(f"{fpath}: missing")
                continue
            if actual != info.get("size"):
                problems.append(f"{fpath}: size {actual}, meta.json says {info.get('size')}")
                continue
            if verify and sha256_file(fpath) != info.get("sha256"):
                problems.append(f"{fpath}: sha256 differs from meta.json")
                continue
            files[name] = fpath
            size += actual
        if problems:
            raise _Corrupt("; ".join(problems))
        return CacheEntry(path.name, path, files, meta, size, last_used)

    def _scan(self) -> tuple[list[CacheEntry], list[Path]]:
        """Entries (unverified) and entry-like folders that cannot be read."""
        good: list[CacheEntry] = []
        bad: list[Path] = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or p.name.startswith(".") or not _KEY_RE.match(p.name):
                continue
            try:
                good.append(self._read(p, verify=False))
            except _Corrupt:
                bad.append(p)
        return good, bad

    def entries(self) -> list[CacheEntry]:
        """Entries present now, least recently used first (payload hashes are not verified here)."""
        with self._locked():
            good, _ = self._scan()
        return sorted(good, key=lambda e: (e.last_used, e.key))

    def load(self, key: str, loader: Callable[[CacheEntry], T]) -> T | None:
        """Verify the entry of ``key`` and return ``loader(entry)``, or None on a miss.

        The loader runs under the lock, so no other process evicts the entry while it reads it;
        it must copy out what it needs to keep. A corrupt entry (checksum mismatch, missing file,
        unreadable meta.json) is removed and reads as a miss (events "corrupt" and "miss"); it is
        never handed to the loader. Exceptions of the loader propagate (the entry stays).
        """
        self._check_key(key)
        with self._locked():
            path = self.root / key
            if not path.is_dir():
                self.metrics.cache_event("miss")
                return None
            try:
                entry = self._read(path, verify=True)
            except _Corrupt as e:
                log.warning("engine cache: removing corrupt entry %s: %s", path, e)
                self._remove(path)
                self.metrics.cache_event("corrupt")
                self.metrics.cache_event("miss")
                return None
            result = loader(entry)
            self._touch(path)
            self.metrics.cache_event("hit")
            return result

    # -- writing -----------------------------------------------------------------

    def _touch(self, path: Path) -> None:
        now = time.time_ns()
        with contextlib.suppress(OSError):
            os.utime(path / META_FILE, ns=(now, now))

    def _remove(self, path: Path) -> None:
        """Rename out of sight first, so a half-deleted folder never looks like an entry."""
        trash = self.root / f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_temp(self) -> None:
        """Remove temp folders: under the lock, any that exist belong to a writer that crashed."""
        for p in self.root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                log.info("engine cache: removing %s left by an interrupted writer", p)
                shutil.rmtree(p, ignore_errors=True)

    def remove(self, key: str) -> bool:
        """Drop the entry of ``key`` (e.g. one that loaded but failed the engine's own checks)."""
        self._check_key(key)
        with self._locked():
            path = self.root / key
            if not path.exists():
                return False
            self._remove(path)
            return True

    def store(self, key: str, files: Mapping[str, Path], meta: Mapping[str, object]) -> CacheEntry:
        """Copy ``files`` (name -> source path) into a new entry of ``key`` and evict down to size.

        ``meta`` must be JSON data (it is written to meta.json next to the cache's bookkeeping).
        If another process stored ``key`` first, its (verified) entry is kept and returned.
        """
        self._check_key(key)
        problems = [f"payload file name {n!r} is not a plain file name"
                    for n in files if not _FILE_RE.match(n)]
        problems += [f"payload file name {n!r} is reserved" for n in files if n == META_FILE]
        problems += [f"payload file {p} does not exist" for p in files.values() if not Path(p).is_file()]
        if CACHE_META_KEY in meta:
            problems.append(f"meta key {CACHE_META_KEY!r} is reserved for the cache")
        if problems:
            raise CacheError(f"engine cache: cannot store {key}: " + "; ".join(problems))
        try:
            meta_doc: dict[str, object] = json.loads(json.dumps(dict(meta), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CacheError(f"engine cache: meta of {key} is not plain JSON data: {e}") from e

        with self._locked():
            self._clean_temp()
            final = self.root / key
            if final.exists():
                try:
                    entry = self._read(final, verify=True)
                    self._touch(final)
                    return entry  # another process stored it first: first one wins
                except _Corrupt as e:
                    log.warning("engine cache: replacing corrupt entry %s: %s", final, e)
                    self._remove(final)
                    self.metrics.cache_event("corrupt")
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                files_meta = {name: self._copy(Path(src), tmp / name) for name, src in files.items()}
                meta_doc[CACHE_META_KEY] = {
                    "key": key,
                    "schema": CACHE_SCHEMA_VERSION,
                    "created": time.time(),
                    "files": files_meta,
                }
                with open(tmp / META_FILE, "w") as f:
                    json.dump(meta_doc, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self._touch(final)  # a precise LRU stamp (the file system's own clock is coarse)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CacheError(f"engine cache: cannot store {key} in {self.root}: {e}") from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.metrics.cache_event("store")
            entry = self._read(final, verify=False)
            self._evict(keep=key)
            return entry

    @staticmethod
    def _copy(src: Path, dst: Path) -> dict[str, object]:
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        return {"sha256": h.hexdigest(), "size": size}

    def _evict(self, *, keep: str) -> None:
        """Drop unreadable folders, then least-recently-used entries until the total fits."""
        good, bad = self._scan()
        for p in bad:
            log.warning("engine cache: removing unreadable entry %s", p)
            self._remove(p)
            self.metrics.cache_event("corrupt")
        total = sum(e.size for e in good)
        for e in sorted(good, key=lambda e: (e.last_used, e.key)):
            if total <= self.max_bytes:
                break
            if e.key == keep:
                continue
            log.info("engine cache: evicting %s (%d bytes, last used %.0f)", e.key, e.size, e.last_used)
            self._remove(e.path)
            total -= e.size
            self.metrics.cache_event("evict")
