"""An Inductor cache entry: the compiler's artifacts and kernels, never the weights.

:data:`ARTIFACTS_FILE` is ``torch.compiler.save_cache_artifacts()`` (the mega-cache: FX graph and
AOTAutograd cache entries, with Triton kernels bundled on CUDA); :data:`KERNELS_FILE` is a tar of the
compiled kernels the mega-cache does not carry (on CPU the C++ kernels' shared objects: without them a
hit still runs the C++ compiler, most of a cold build; see docs/benchmarks.md). ``meta.json`` holds
the weight list (``weights``) and the number of kernel files (``kernel_files``).
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from serving.cache import CacheEntry
from serving.engines.cached_build import EntryUnfit, weights_from_meta, weights_meta
from serving.specs import WeightSpec

#: payload files of a cache entry
ARTIFACTS_FILE = "artifacts.bin"
KERNELS_FILE = "kernels.tar"
#: folders of the private Inductor cache that the mega-cache already carries (or that are not code)
_NOT_KERNELS = ("fxgraph", "aotautograd", "locks")


def kernel_files(root: Path) -> list[Path]:
    """Files under a private Inductor cache folder that hold compiled kernels (relative paths)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and rel.parts[0] not in _NOT_KERNELS:
            out.append(rel)
    return out


def pack_kernels(root: Path, dest: Path) -> int:
    """Tar the kernel files of ``root`` into ``dest``; the number of files."""
    files = kernel_files(root)
    with tarfile.open(dest, "w") as tar:
        for rel in files:
            tar.add(root / rel, arcname=str(rel), recursive=False)
    return len(files)


def unpack_kernels(archive: Path, root: Path) -> None:
    """Extract a :func:`pack_kernels` archive into ``root`` (regular files only, nothing outside)."""
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def copy_out(entry: CacheEntry, workdir: Path, compile_dir: Path) -> Mapping[str, object]:
    """Copy the artifacts into ``workdir`` and unpack the kernels into the private Inductor cache folder
    ``compile_dir``; the entry's metadata. :class:`EntryUnfit` for a missing file or a bad archive."""
    if ARTIFACTS_FILE not in entry.files:
        raise EntryUnfit([f"the entry has no {ARTIFACTS_FILE} (it has {sorted(entry.files)})"])
    shutil.copyfile(entry.files[ARTIFACTS_FILE], workdir / ARTIFACTS_FILE)
    if KERNELS_FILE in entry.files:
        try:
            unpack_kernels(entry.files[KERNELS_FILE], compile_dir)
        except tarfile.TarError as e:
            raise EntryUnfit([f"{KERNELS_FILE}: {type(e).__name__}: {e}"]) from e
    return entry.meta


def entry_problems(meta: Mapping[str, object], specs: Mapping[str, WeightSpec]) -> list[str]:
    """A cached weight list against the module's (a key collision is never served)."""
    try:
        cached = weights_from_meta(meta)
    except EntryUnfit as e:
        return list(e.problems)
    if cached != dict(specs):
        return [f"cached weights {sorted(set(cached) ^ set(specs))[:5] or 'shapes/dtypes'} differ from the module"]
    return []


def entry_meta(specs: Mapping[str, WeightSpec], kernel_count: int) -> dict[str, object]:
    """The engine's part of a new entry's metadata."""
    return {"weights": weights_meta(specs), "kernel_files": kernel_count}


def artifact_bytes(entry: CacheEntry) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every payload file of an entry, the tar's members unpacked (for inspection)."""
    for name, path in entry.files.items():
        if name == KERNELS_FILE:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    f = tar.extractfile(member)
                    if f is not None:
                        yield f"{name}:{member.name}", f.read()
        else:
            yield name, path.read_bytes()


__all__ = ["ARTIFACTS_FILE", "KERNELS_FILE", "artifact_bytes", "copy_out", "entry_meta", "entry_problems",
           "kernel_files", "pack_kernels", "unpack_kernels"]
