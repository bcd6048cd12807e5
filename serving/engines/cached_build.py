"""The cache-or-compile flow of the compiled engines (``aoti``, ``inductor``), in one place.

An engine describes its build as a :class:`Recipe`: the fields of its cache key, how to copy an
entry out of the cache, how to make the engine's parts from that copy (or say the entry does not fit
this model), how to compile, and what to store. :func:`cached_build` runs it:

1. the key (:func:`serving.cache.cache_key` of :meth:`Recipe.key_fields`) and a private work folder,
   which the engine owns afterwards (its slots load from it);
2. on a cache hit, :meth:`Recipe.copy_out` under the cache's lock, then :meth:`Recipe.from_entry`;
   an entry that does not fit (:class:`EntryUnfit`) is dropped from the cache and rebuilt, never served;
   a cache that cannot be used at all is logged and the build goes on without it;
3. otherwise :meth:`Recipe.compile`, then :meth:`Recipe.entry` is stored (a failure to store is logged:
   the engine is fine, only the next start is slower).

It also words the build detail the same way for every engine ("loaded from the engine cache; the cold
build took X s, Y s saved", "compiled in X s", "kept in the engine, not refitted: ...").
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
import platform
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Generic, TypeVar

import torch

from serving.cache import CacheEntry, EngineCache, cache_key
from serving.engines.base import BuildInfo, Engine, WeightSlot
from serving.errors import CacheError, NotReadyError
from serving.specs import BuildSpec, WeightSpec

log = logging.getLogger(__name__)

P = TypeVar("P")
S = TypeVar("S", bound=WeightSlot)


class EntryUnfit(Exception):
    """A cache entry whose files verified but which does not fit this model (a key collision, an entry
    missing a file, an entry of an older layout): it is removed and the engine rebuilt."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Made(Generic[P]):
    """What a recipe made (from an entry or by compiling): the engine's parts, and words for the build detail."""

    parts: P
    #: how it went ("compiled in 3.1s", "2 graph(s) from it, 0 compiled")
    note: str = ""
    #: tensors kept in the engine, and why each (see :attr:`serving.engines.base.Engine.kept_tensors`)
    kept: Mapping[str, str] = field(default_factory=dict)


class Recipe(abc.ABC, Generic[P]):
    """How one compiled engine is keyed, loaded from an entry, compiled and stored."""

    #: the engine's kind (names its work folder)
    kind: str = "engine"
    #: names the engine in logs and errors ("AOTI engine")
    label: str = "engine"

    def __init__(self, spec: BuildSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def key_fields(self) -> dict[str, object]:
        """Everything the build depends on apart from the weights (:func:`serving.cache.cache_key_fields`)."""

    @abc.abstractmethod
    def copy_out(self, entry: CacheEntry, workdir: Path) -> Mapping[str, object]:
        """Copy what the engine keeps of a verified ``entry`` into ``workdir``; the entry's metadata.

        Runs under the cache's lock (keep it short); raise :class:`EntryUnfit` for an entry lacking a file.
        """

    @abc.abstractmethod
    def from_entry(self, meta: Mapping[str, object], workdir: Path) -> Made[P]:
        """The engine's parts from a copied-out entry; :class:`EntryUnfit` naming every problem when it does not
        fit this model."""

    @abc.abstractmethod
    def compile(self, workdir: Path) -> Made[P]:
        """Build the engine's parts from the model, in ``workdir``, checked to be refittable."""

    @abc.abstractmethod
    def entry(self, made: Made[P], staging: Path) -> tuple[dict[str, Path], dict[str, object]]:
        """The payload files (temporary ones written under ``staging``, removed after the store) and the
        engine's metadata of a new entry. :class:`~serving.errors.CacheError` or ``OSError``: nothing to store."""


@dataclass(frozen=True)
class Outcome(Generic[P]):
    """A finished build: the parts, how it went, and the work folder the engine now owns."""

    parts: P
    info: BuildInfo
    workdir: Path


def cached_build(recipe: Recipe[P], cache: EngineCache | None, *, started: float) -> Outcome[P]:
    """Load ``recipe``'s engine from ``cache`` when an entry fits, else compile it and store it.

    ``started`` is the ``time.perf_counter()`` of the build's start (build times are counted from it).
    On an error the work folder is removed.
    """
    fields = recipe.key_fields()
    key = cache_key(fields)
    workdir = Path(tempfile.mkdtemp(prefix=f"hotswap-{recipe.kind}-"))
    try:
        detail = ""
        if cache is not None:
            try:
                hit = _from_cache(recipe, cache, key, workdir)
            except CacheError as e:
                log.warning("%s: cache unusable, building without it: %s", recipe.label, e)
                hit, detail, cache = None, f"cache unusable: {e}", None
            if hit is not None:
                made, meta = hit
                info = BuildInfo("hit", time.perf_counter() - started, key, _hit_detail(made, meta, started))
                return Outcome(made.parts, info, workdir)
        made = recipe.compile(workdir)
        outcome, words = "bypass", [detail, made.note]
        if cache is not None:
            outcome = "miss"
            words.append(_store(recipe, cache, key, fields, made, workdir, started))
        words.append(kept_note(made.kept))
        info = BuildInfo(outcome, time.perf_counter() - started, key, "; ".join(w for w in words if w))
        return Outcome(made.parts, info, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _from_cache(recipe: Recipe[P], cache: EngineCache, key: str,
                workdir: Path) -> tuple[Made[P], Mapping[str, object]] | None:
    """The recipe's parts from the entry of ``key``, or None (a miss, or an entry dropped for not fitting)."""
    try:
        meta = cache.load(key, lambda entry: recipe.copy_out(entry, workdir))
    except OSError as e:  # our own copy failed (e.g. the temp folder is full): not the entry's fault
        raise CacheError(f"{recipe.label}: cannot copy the cache entry {key} into {workdir}: {e}") from e
    except EntryUnfit as e:
        unfit = e
    else:
        if meta is None:
            return None
        try:
            return recipe.from_entry(meta, workdir), meta
        except EntryUnfit as e:
            unfit = e
    # a key collision or a half-compatible entry: never serve it, rebuild instead
    log.warning("%s: cache entry %s does not fit this model (%s); rebuilding", recipe.label, key, unfit)
    cache.remove(key)
    for p in list(workdir.iterdir()):  # the compile starts from an empty folder
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return None


def _hit_detail(made: Made[P], meta: Mapping[str, object], started: float) -> str:
    detail = "loaded from the engine cache" + (f" ({made.note})" if made.note else "")
    built = meta.get("build_seconds")
    if isinstance(built, (int, float)):
        elapsed = time.perf_counter() - started
        detail += f"; the cold build took {built:.1f}s, {max(0.0, built - elapsed):.1f}s saved"
    return "; ".join(w for w in (detail, kept_note(made.kept)) if w)


def _store(recipe: Recipe[P], cache: EngineCache, key: str, fields: Mapping[str, object], made: Made[P],
           workdir: Path, started: float) -> str:
    """Store a new entry; '' or why it was not stored (the engine is fine, only the next build is slower)."""
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=workdir))
    try:
        files, own = recipe.entry(made, staging)
        meta = {"fields": dict(fields), "factory": recipe.spec.factory, **own,
                "build_seconds": round(time.perf_counter() - started, 3)}
        cache.store(key, files, meta)
    except (CacheError, OSError) as e:
        log.warning("%s: could not store in the cache: %s", recipe.label, e)
        return f"not stored: {e}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ""


def kept_note(kept: Mapping[str, str]) -> str:
    """The build detail's words for the tensors an engine keeps ('' when none)."""
    if not kept:
        return ""
    return "kept in the engine, not refitted: " + ", ".join(f"{n!r} ({why})" for n, why in kept.items())


class CompiledEngine(Engine, Generic[S]):
    """What the compiled engines share: the work folder from :func:`cached_build` (removed when the engine is
    closed or collected), the weight list, and the slot the build checked, handed out as the first slot."""

    #: names the engine in errors ("AOTI engine")
    label: str = "compiled engine"

    def __init__(self, *, spec: BuildSpec, device: torch.device, build_info: BuildInfo, workdir: Path,
                 weight_specs: Mapping[str, WeightSpec], spare: S | None, ignored: frozenset[str] = frozenset(),
                 kept: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(device, build_info)
        self.spec = spec
        self.ignored_names = ignored
        self.kept_tensors = MappingProxyType(dict(kept or {}))
        self._weight_specs = MappingProxyType(dict(weight_specs))
        self._spare = spare
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(workdir), True)

    @abc.abstractmethod
    def make_slot(self) -> S:
        """A new slot (after the first, which the build made)."""

    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self._weight_specs

    def new_slot(self) -> S:
        if not self._finalizer.alive:
            raise NotReadyError(f"{self.label} {self.spec.factory} is closed")
        with self._lock:
            slot, self._spare = self._spare, None
        return slot if slot is not None else self.make_slot()

    def close(self) -> None:
        self._spare = None
        self._finalizer()


# --------------------------------------------------------------------------- entry and key helpers


def weights_meta(specs: Mapping[str, WeightSpec]) -> list[object]:
    """The weight list of an entry's metadata (JSON)."""
    return [s.to_json() for s in specs.values()]


def weights_from_meta(meta: Mapping[str, object]) -> dict[str, WeightSpec]:
    """The weight list of an entry's metadata; :class:`EntryUnfit` when it is not one."""
    raw = meta.get("weights")
    if not isinstance(raw, list):
        raise EntryUnfit(["meta.json: 'weights' must be a list"])
    try:
        return {s.name: s for s in (WeightSpec.from_json(d) for d in raw)}
    except (KeyError, ValueError, TypeError) as e:
        raise EntryUnfit([f"meta.json: unreadable weight list ({type(e).__name__}: {e})"]) from e


@functools.lru_cache(maxsize=1)
def host_cpu_fields() -> dict[str, str]:
    """The host CPU, for the cache key of an engine whose C++ is compiled with ``-march=native``."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "cpu model") and not model:
                    model = v.strip()
                elif k in ("flags", "features") and not flags:
                    flags = v.strip()
                if model and flags:
                    break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "model": model or platform.processor(),
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest(),
    }


__all__ = ["CompiledEngine", "EntryUnfit", "Made", "Outcome", "Recipe", "cached_build", "host_cpu_fields", "kept_note",
           "weights_from_meta", "weights_meta"]
