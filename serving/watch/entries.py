"""What one top-level name in the weights folder is: inspection and completeness.

Functions of the folder's contents and the :class:`~serving.weights.CheckpointPolicy`; no threads,
no state. Files are only stat'ed and read, never modified. A version's publish time
(:func:`publish_time_ns`) is decided here and nowhere else; its identity (content hash) in
:mod:`serving.watch.identity`.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serving.errors import CheckpointError, HotswapError, reading
from serving.hashing import sha256_file
from serving.publish.protocol import (
    ADAPTER_CONFIG,
    MANIFEST_NAME,
    FoundFile,
    Manifest,
    classify_name,
    is_temp_name,
    manifest_problems,
    parse_manifest,
    version_of,
)
from serving.watch.ledger import Fingerprint
from serving.weights import CheckpointPolicy, describe_checkpoint, detect_checkpoint, read_header
from serving.weights.lora import adapter_weights_file, read_adapter_config

#: a version directory with more files than this is refused without reading it
DEFAULT_MAX_FILES = 1000

Problem = tuple[str, str]  # (reason, message)
Row = tuple[str, int, int, int, int]  # (relative path, size, mtime_ns, inode, mode)


@dataclass
class Entry:
    """What was found on disk for one top-level name (filled in as the worker learns more)."""

    name: str
    path: Path
    kind: str  # "checkpoint" | "adapter"
    is_dir: bool
    fp: Fingerprint
    #: when the entry arrived in the folder: its inode change time (a rename, a copy tool setting times,
    #: `touch`), which copy tools cannot carry over from the source, unlike mtime
    arrived_ns: int
    version: str
    manifest: Manifest | None = None
    #: refused without reading (symlink outside the folder, too many files, not a regular file, ...)
    problem: Problem | None = None
    #: may only mean "still being copied" (unparseable manifest, a file vanished while listing)
    soft: Problem | None = None
    content_hash: str | None = None
    first_event: float | None = None


#: what :func:`inspect_entry` finds besides an entry: nothing there, a temp name, or not a checkpoint
Absent = Literal["gone", "temp", "ignored"]


def row(rel: str, st: os.stat_result) -> Row:
    return (rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)


def age_s(fp: Fingerprint) -> float:
    """Seconds since the newest modification inside the entry."""
    return max(0.0, time.time() - fp.newest_mtime_ns / 1e9)


def publish_time_ns(entry: Entry) -> int:
    """When the entry was published, for ordering versions (docs/publish.md): when it arrived in the folder.

    Not its mtime: ``cp -a``, ``rsync -a``, ``tar -x`` and object-store sync keep the source's mtime, so a
    version copied in today could look older than the live one. The inode change time is set by the
    arrival itself (create, rename, or the tool setting the times) and survives a restart.
    """
    return entry.arrived_ns


def _root(policy: CheckpointPolicy) -> Path | None:
    return policy.root.resolve() if policy.root is not None else None


def inspect_entry(folder: Path, name: str, policy: CheckpointPolicy, max_files: int) -> Entry | Absent:
    """Stat ``folder/name`` (never reading data): kind, fingerprint, version, problems found on the way."""
    path = folder / name
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return "gone"
    target = path
    if stat.S_ISLNK(lst.st_mode):
        fp = Fingerprint((row("", lst),))
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            return Entry(name, path, "checkpoint", False, fp, lst.st_ctime_ns, version_of(name, is_dir=False),
                         soft=("not_found", f"{path}: dangling or looping symlink ({e})"))
        root = _root(policy)
        if root is not None and not target.is_relative_to(root):
            return Entry(name, path, "checkpoint", False, fp, lst.st_ctime_ns, version_of(name, is_dir=False),
                         problem=("outside_root", f"{path} -> {target}: the symlink points outside the weights "
                                  f"folder {root}; copy or move the checkpoint into the folder instead"))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return "gone"
    except OSError as e:
        fp = Fingerprint((row("", lst),))
        return Entry(name, path, "checkpoint", False, fp, lst.st_ctime_ns, version_of(name, is_dir=False),
                     problem=("unreadable", f"{path}: cannot stat: {e}"))
    is_dir = stat.S_ISDIR(st.st_mode)
    has_adapter = is_dir and os.path.lexists(path / ADAPTER_CONFIG)
    kind = classify_name(name, is_dir=is_dir, has_adapter_config=has_adapter)
    if kind == "temp":
        return "temp"
    if kind == "ignored":
        return "ignored"
    if not is_dir:
        problem: Problem | None = None
        if not stat.S_ISREG(st.st_mode):
            problem = ("unsupported", f"{path}: not a regular file (a fifo, socket or device?); "
                                      f"publish checkpoints as regular files")
        return _finish(name, path, kind, False, Fingerprint((row("", st),)), st.st_ctime_ns, None, problem, policy)
    rows, problem = walk(path, _root(policy), max_files)
    manifest: Manifest | None = None
    soft: Problem | None = None
    if problem is not None and problem[0] == "not_found":
        problem, soft = None, problem
    if problem is None and soft is None and os.path.lexists(path / MANIFEST_NAME):
        try:
            manifest = parse_manifest(read_small(path / MANIFEST_NAME, policy), str(path / MANIFEST_NAME))
        except HotswapError as e:
            if e.reason == "outside_root":
                problem = (e.reason, str(e))
            else:
                soft = (e.reason, str(e))
    entry = _finish(name, path, kind, True, Fingerprint(tuple(rows)), st.st_ctime_ns, manifest, problem, policy)
    entry.soft = soft
    return entry


def _finish(name: str, path: Path, kind: str, is_dir: bool, fp: Fingerprint, arrived_ns: int,
            manifest: Manifest | None, problem: Problem | None, policy: CheckpointPolicy) -> Entry:
    if problem is None and fp.total_size > policy.max_bytes:
        problem = ("too_large", f"{path}: {fp.total_size} bytes, over the cap of {policy.max_bytes} "
                                f"(max_file_bytes); raise the cap if this is expected")
    version = version_of(name, is_dir=is_dir, manifest_version=manifest.version if manifest else None)
    return Entry(name, path, kind, is_dir, fp, arrived_ns, version, manifest, problem)


def read_small(path: Path, policy: CheckpointPolicy) -> bytes:
    """The first 2 MiB of a small file inside the folder (a manifest)."""
    with reading(path, gone="disappeared while reading", gone_reason="not_found"):
        real = path.resolve(strict=True)
        root = _root(policy)
        if root is not None and not real.is_relative_to(root):
            raise CheckpointError(f"{path} -> {real}: outside the weights folder", reason="outside_root")
        if not real.is_file():
            raise CheckpointError(f"{path}: not a regular file", reason="manifest_invalid")
        with open(real, "rb") as f:
            return f.read(2 << 20)


def walk(top: Path, root: Path | None, max_files: int) -> tuple[list[Row], Problem | None]:
    """Fingerprint rows of a directory (itself, then every entry below it), capped at ``max_files``."""
    rows = [row("", os.stat(top))]
    stack = [""]
    count = 0
    while stack:
        rel_dir = stack.pop()
        directory = top / rel_dir if rel_dir else top
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except PermissionError:
            return rows, ("unreadable", f"{directory}: permission denied listing the directory")
        except FileNotFoundError:
            return rows, ("not_found", f"{directory}: disappeared while listing it")
        for child in children:
            count += 1
            if count > max_files:
                return rows, ("too_many_files", f"{top}: more than {max_files} files and directories; a "
                                                f"checkpoint or adapter has a handful (shards, index, config)")
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                lst = child.stat(follow_symlinks=False)
                if child.is_symlink():
                    real = Path(child.path).resolve(strict=True)
                    if root is not None and not real.is_relative_to(root):
                        return rows, ("outside_root", f"{top / rel} -> {real}: symlink pointing outside the "
                                                      f"weights folder {root}")
                    st = os.stat(real)
                else:
                    st = lst
            except FileNotFoundError:
                return rows, ("not_found", f"{top / rel}: disappeared, or a dangling symlink")
            except (OSError, RuntimeError) as e:
                return rows, ("unreadable", f"{top / rel}: cannot stat: {e}")
            if stat.S_ISDIR(st.st_mode):
                rows.append(row(rel + "/", st))
                if not child.is_symlink():
                    stack.append(rel)
            elif stat.S_ISREG(st.st_mode):
                rows.append(row(rel, st))
            else:
                return rows, ("unsupported", f"{top / rel}: not a regular file (a fifo, socket or device?)")
    return rows, None


def check_complete(entry: Entry, policy: CheckpointPolicy) -> Problem | None:
    """The cheap completeness check: headers agree with file sizes, or the manifest verifies
    (which also sets ``entry.content_hash``)."""
    if entry.soft is not None:
        return entry.soft
    try:
        if entry.manifest is not None:
            return verify_manifest(entry)
        if entry.kind == "adapter":
            read_adapter_config(entry.path, policy)
            weights = adapter_weights_file(entry.path)
            if weights is not None and weights.suffix == ".safetensors":
                read_header(weights)
            return None
        if entry.is_dir:
            describe_checkpoint(detect_checkpoint(entry.path, policy), policy)
            return None
        candidate = detect_checkpoint(entry.path, policy)  # regular, non-empty, allowed by the policy
        if candidate.format == "safetensors":
            read_header(candidate.files[0])
        return None
    except HotswapError as e:
        return (e.reason, str(e))


def verify_manifest(entry: Entry) -> Problem | None:
    manifest = entry.manifest
    assert manifest is not None
    sizes = {r[0]: r[1] for r in entry.fp.rows if r[0] and not r[0].endswith("/")}
    found: dict[str, FoundFile] = {}
    for f in manifest.files:
        if f.path not in sizes:
            continue
        size = sizes[f.path]
        digest = None
        if f.size is None or f.size == size:
            try:
                digest = sha256_file(entry.path / f.path)
            except OSError as e:
                return ("unreadable", f"{entry.path / f.path}: cannot read: {e}")
        found[f.path] = FoundFile(size, digest)
    listed = {f.path for f in manifest.files}
    others = [rel for rel in sizes if rel != MANIFEST_NAME and rel not in listed
              and not any(is_temp_name(part) for part in rel.split("/"))]
    problems = manifest_problems(manifest, found, others)
    if problems:
        return ("manifest_mismatch", f"{entry.path}: does not match its {MANIFEST_NAME} (incomplete copy or "
                                     f"stale manifest): " + "; ".join(problems[:10]))
    entry.content_hash = manifest.content_hash()
    return None
