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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from serving.cache import CacheEntry
from serving.engines.cached_build import EntryUnfit, weights_from_meta, weights_meta
from serving.specs import WeightSpec

#: payload files of a cache entry
ARTIFACTS_FILE = "artifacts.bin"
KERNELS_FILE = "kernels.tar"
#: folders of the private Inductor cache that the mega-cache already carries (or that are not code)
_NOT_KERNELS = ("fxgraph", "aotautograd", "locks")
#: the largest kernel file, and all kernel files together, accepted from a cache entry (a hostile or damaged
#: archive must not fill the disk; an engine's kernels are far smaller)
MAX_KERNEL_FILE_BYTES = 1 << 30
MAX_KERNELS_BYTES = 8 << 30


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


def member_problems(members: Sequence[tarfile.TarInfo], root: Path) -> list[str]:
    """Everything that keeps an archive's members from being unpacked into ``root``: anything but regular files
    and folders (links, devices, fifos), absolute names, names that lead outside ``root`` or repeat, files over
    :data:`MAX_KERNEL_FILE_BYTES` or :data:`MAX_KERNELS_BYTES` in all. Pure."""
    problems: list[str] = []
    seen: set[PurePosixPath] = set()
    files = {PurePosixPath(m.name) for m in members if m.isreg()}
    total = 0
    for m in members:
        name = PurePosixPath(m.name)
        if not (m.isreg() or m.isdir()):
            problems.append(f"{m.name!r}: not a regular file or folder (a link, device or fifo)")
        if name.is_absolute():
            problems.append(f"{m.name!r}: an absolute name")
        elif not name.parts:
            problems.append(f"{m.name!r}: an empty name")
        elif ".." in name.parts or not (root / name).resolve().is_relative_to(root.resolve()):
            problems.append(f"{m.name!r}: leads outside the folder")
        if name in seen:
            problems.append(f"{m.name!r}: in the archive more than once")
        if files.intersection(name.parents):
            problems.append(f"{m.name!r}: inside a path the archive also has as a file")
        seen.add(name)
        if m.isreg() and m.size > MAX_KERNEL_FILE_BYTES:
            problems.append(f"{m.name!r}: {m.size} bytes, more than a kernel file may have ({MAX_KERNEL_FILE_BYTES})")
        total += m.size if m.isreg() else 0
    if total > MAX_KERNELS_BYTES:
        problems.append(f"{total} bytes in all, more than the kernels may have ({MAX_KERNELS_BYTES})")
    return problems


def unpack_kernels(archive: Path, root: Path) -> None:
    """Extract a :func:`pack_kernels` archive into ``root``: every member is checked first
    (:func:`member_problems`), then regular files and folders are written, nothing else and nothing outside.

    ``TarFile.extractall(filter=...)`` would do the checks only on Pythons from 3.10.12 and 3.11.4 (PEP 706);
    the project accepts 3.10 and 3.11 from their first releases. :class:`EntryUnfit` names every problem;
    nothing is written then.
    """
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        problems = member_problems(members, root)
        if problems:
            raise EntryUnfit([f"{archive}: refusing to unpack: {p}" for p in problems])
        root.mkdir(parents=True, exist_ok=True)
        for m in members:
            dest = root / m.name
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # a regular file
            with src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out)
            dest.chmod((m.mode & 0o755) | 0o600)  # loadable shared objects; nothing set-id, nobody else writes


def copy_out(entry: CacheEntry, workdir: Path, compile_dir: Path) -> Mapping[str, object]:
    """Copy the artifacts into ``workdir`` and unpack the kernels into the private Inductor cache folder
    ``compile_dir``; the entry's metadata. :class:`EntryUnfit` for a missing file or a bad archive."""
    if ARTIFACTS_FILE not in entry.files:
        raise EntryUnfit([f"the entry has no {ARTIFACTS_FILE} (it has {sorted(entry.files)})"])
    shutil.copyfile(entry.files[ARTIFACTS_FILE], workdir / ARTIFACTS_FILE)
    if KERNELS_FILE in entry.files:
        try:
            unpack_kernels(entry.files[KERNELS_FILE], compile_dir)
        except tarfile.TarError as e:  # not a readable tar
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


__all__ = ["ARTIFACTS_FILE", "KERNELS_FILE", "MAX_KERNELS_BYTES", "MAX_KERNEL_FILE_BYTES", "artifact_bytes", "copy_out",
           "entry_meta", "entry_problems", "kernel_files", "member_problems", "pack_kernels", "unpack_kernels"]
