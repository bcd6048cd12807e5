"""An AOTI cache entry: the stripped ``.pt2`` package, the tensors the engine keeps, and the weight list.

``meta.json`` (beside the cache's own bookkeeping and the flow's ``fields``, ``factory`` and
``build_seconds``) holds ``weights`` (the weight specs), ``ignored`` (state-dict names that are not
weights) and ``kept`` (name -> why, for the tensors in :data:`KEPT_FILE`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from serving.cache import CacheEntry
from serving.engines.cached_build import EntryUnfit, weights_from_meta, weights_meta
from serving.specs import WeightSpec

#: the payload file of a cache entry
PACKAGE_FILE = "model.pt2"
#: the tensors the engine keeps (non-persistent buffers, traced constants: no weights), when there are any
KEPT_FILE = "kept.safetensors"


def copy_out(entry: CacheEntry, workdir: Path) -> Mapping[str, object]:
    """Our own copy of the package (slots load it later, after the entry may have been evicted) and of the kept
    tensors; the entry's metadata."""
    if PACKAGE_FILE not in entry.files or (entry.meta.get("kept") and KEPT_FILE not in entry.files):
        raise EntryUnfit([f"the entry lacks {PACKAGE_FILE} or {KEPT_FILE} (it has {sorted(entry.files)})"])
    shutil.copyfile(entry.files[PACKAGE_FILE], workdir / PACKAGE_FILE)
    if entry.meta.get("kept"):
        shutil.copyfile(entry.files[KEPT_FILE], workdir / KEPT_FILE)
    return entry.meta


def entry_meta(specs: Mapping[str, WeightSpec], ignored: frozenset[str], kept: Mapping[str, str]) -> dict[str, object]:
    """The engine's part of a new entry's metadata."""
    return {"weights": weights_meta(specs), "ignored": sorted(ignored), "kept": dict(kept)}


def read_meta(meta: Mapping[str, object]) -> tuple[dict[str, WeightSpec], frozenset[str], dict[str, str]]:
    """(weight specs, ignored names, kept name -> why) of an entry; :class:`EntryUnfit` when unreadable."""
    specs = weights_from_meta(meta)
    ignored, kept = meta.get("ignored"), meta.get("kept", {})
    if not isinstance(ignored, list) or not isinstance(kept, dict):
        raise EntryUnfit(["meta.json: 'ignored' must be a list and 'kept' an object"])
    return specs, frozenset(str(n) for n in ignored), {str(k): str(v) for k, v in kept.items()}


def write_kept(kept: Mapping[str, torch.Tensor], workdir: Path) -> None:
    """Save the kept tensors for the cache entry (nothing when there are none)."""
    if kept:
        from safetensors.torch import save_file

        save_file({n: t.to("cpu") for n, t in kept.items()}, str(workdir / KEPT_FILE))


def read_kept(workdir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The kept tensors of a copied-out entry, on ``device``; :class:`EntryUnfit` when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {n: t.to(device) for n, t in load_file(str(workdir / KEPT_FILE)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise EntryUnfit([f"{KEPT_FILE}: unreadable ({type(e).__name__}: {e})"]) from e


__all__ = ["KEPT_FILE", "PACKAGE_FILE", "copy_out", "entry_meta", "read_kept", "read_meta", "write_kept"]
