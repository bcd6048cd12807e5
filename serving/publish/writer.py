"""Publishing a version into a weights folder: the writer's side of the publish protocol.

A version is written under a hidden temporary name inside the folder (which the watcher ignores),
flushed to disk, stamped with its publish time, and renamed into place: one atomic step after
which the watcher sees it complete. Directories carry a ``MANIFEST.json`` with every file's
sha256, so a copy altered after publishing is refused rather than installed. The rules are in
``docs/publish.md``; names and the manifest format come from :mod:`serving.publish.protocol`.

* :func:`publish` copies a file or directory (a safetensors file, a sharded checkpoint, a
  ``save_pretrained`` output, a PEFT adapter); ``hotswap publish`` is this function.
* :func:`publish_tensors` writes an in-memory state dict (a training loop's checkpoint).
* :func:`staging` hands out the temporary entry for writers of their own (:class:`Staged`).

The source is only read. An interrupted publish removes its temporary entry; a process killed
mid-publish leaves only a hidden ``.NAME.<random>.tmp`` entry, which the watcher ignores and which
can be deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from serving.errors import PublishError
from serving.hashing import sha256_file
from serving.publish.protocol import (
    CHECKPOINT_SUFFIXES,
    MANIFEST_NAME,
    ManifestEntry,
    entry_name,
    is_temp_name,
    render_manifest,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: bytes per read while copying (and hashing) a file
COPY_CHUNK = 16 << 20
#: a source directory with more files than this is refused (the watcher refuses more than 1000 entries)
MAX_FILES = 1000

PathLike = str | os.PathLike[str]


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _newest_mtime_ns(folder: Path) -> int:
    """The newest modification time among the folder's visible entries (0 if none)."""
    newest = 0
    with os.scandir(folder) as it:
        for e in it:
            if not is_temp_name(e.name):
                with contextlib.suppress(OSError):
                    newest = max(newest, e.stat(follow_symlinks=False).st_mtime_ns)
    return newest


class Staged:
    """One version being written under a hidden temporary name inside the weights folder.

    Write into :attr:`temp` (a file path, or a directory that exists), then :meth:`commit`.
    :meth:`seal` (called by :meth:`commit` if not done before) flushes everything to disk and
    stamps the publish time; a caller timing the rename itself calls it first.
    """

    def __init__(self, folder: Path, name: str, *, directory: bool) -> None:
        self.folder = folder
        self.final = folder / name
        self.directory = directory
        self.temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        self.sealed = False
        self.committed = False
        if directory:
            os.mkdir(self.temp, 0o777)  # the umask decides, as for any directory the user makes

    def seal(self) -> None:
        """Flush every file and directory of the entry to disk, then stamp its publish time: now, or
        just after the newest entry in the folder, so that it is the newest version by the protocol's
        order even when two publishes fall in one file-system timestamp tick."""
        if not os.path.lexists(self.temp):
            raise PublishError(f"{self.temp}: nothing was written for {self.final.name}")
        if self.directory:
            for top, dirs, files in os.walk(self.temp):
                for f in files:
                    _fsync(Path(top, f))
                for d in dirs:
                    _fsync(Path(top, d), directory=True)
            _fsync(self.temp, directory=True)
        else:
            _fsync(self.temp)
        stamp = max(time.time_ns(), _newest_mtime_ns(self.folder) + 1_000)
        os.utime(self.temp, ns=(stamp, stamp), follow_symlinks=False)
        self.sealed = True

    def commit(self) -> Path:
        """Rename the entry into place (atomically replacing a file of the same name; a directory
        of the same name is moved aside first and deleted after), flush the folder, return the path."""
        if self.committed:
            return self.final
        if not self.sealed:
            self.seal()
        aside: Path | None = None
        if self.directory and self.final.is_dir() and not self.final.is_symlink():
            aside = self.folder / f".{self.final.name}.{secrets.token_hex(4)}.replaced.tmp"
            os.rename(self.final, aside)
        try:
            os.replace(self.temp, self.final)
        except OSError as e:
            if aside is not None:
                with contextlib.suppress(OSError):
                    os.rename(aside, self.final)
            raise PublishError(f"{self.final}: cannot rename {self.temp.name} into place: {e}") from e
        self.committed = True
        _fsync(self.folder, directory=True)
        if aside is not None:
            _remove(aside)
        return self.final

    def discard(self) -> None:
        """Remove the temporary entry (nothing visible was ever created)."""
        if not self.committed:
            _remove(self.temp)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _os_failure(e: OSError, name: str, folder: Path, nbytes: int | None) -> str:
    """Why writing ``name`` into ``folder`` failed, and the fix; a full disk or quota said in so many words."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device (ENOSPC)" if e.errno == errno.ENOSPC else "disk quota exceeded (EDQUOT)"
        free = _free_bytes(folder)
        sizes = ", ".join(filter(None, [f"the version has {nbytes} bytes" if nbytes is not None else "",
                                        f"{free} bytes are free there now" if free is not None else ""]))
        return (f"publishing {name} into {folder}: {what}{f' ({sizes})' if sizes else ''}; nothing was "
                f"published and the partial copy was removed. Free space on that file system (delete versions "
                f"no longer needed from the folder) or give it more, then publish again")
    return f"publishing {name} into {folder}: {e}; nothing was published"


@contextlib.contextmanager
def staging(to: PathLike, name: str, *, directory: bool = False, nbytes: int | None = None) -> Iterator[Staged]:
    """A :class:`Staged` entry that becomes ``to/name``: committed when the block ends (if the block
    did not commit it), discarded if the block raises. ``to`` is created if missing. ``nbytes`` (the size
    being written, when known) goes into the message of a full disk."""
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        staged = Staged(folder, name, directory=directory)
    except OSError as e:
        raise PublishError(_os_failure(e, name, folder, nbytes)) from e
    try:
        yield staged
        staged.commit()
    except OSError as e:
        staged.discard()
        raise PublishError(_os_failure(e, name, folder, nbytes)) from e
    except BaseException:
        staged.discard()
        raise


def _copy_file(src: Path, dst: Path, *, digest: bool, link: bool) -> tuple[str, int]:
    """Copy (or hard-link) one file: (sha256 of the bytes written, or "" without ``digest``; size)."""
    size = os.stat(src).st_size
    if link:
        os.link(src, dst)
        return (sha256_file(dst) if digest else ""), size
    h = hashlib.sha256() if digest else None
    copied = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        if h is None:
            shutil.copyfileobj(fin, fout, COPY_CHUNK)
            copied = fout.tell()
        else:
            buf = bytearray(COPY_CHUNK)
            view = memoryview(buf)
            while n := fin.readinto(buf):
                h.update(view[:n])
                fout.write(view[:n])
                copied += n
    if copied != size:
        raise PublishError(f"{src}: {copied} bytes copied but the file had {size} when the copy started: it is "
                           f"being written; publish it once its writer is done")
    return (h.hexdigest() if h is not None else ""), copied


def _source_files(src: Path, *, skip_manifest: bool) -> list[str]:
    """Relative paths of the regular files to copy from a source directory (symlinks followed).

    Hidden and temporary names are left out (the watcher ignores them), each with a log line.
    """
    files: list[str] = []
    visited: set[Path] = set()

    def visit(directory: Path, prefix: str) -> None:
        real = directory.resolve()
        if real in visited:
            raise PublishError(f"{directory}: a symlink loop in the source directory")
        visited.add(real)
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            rel = prefix + child.name
            if is_temp_name(child.name):
                log.info("publish: not copying %s (a hidden or temporary name, which the watcher ignores)",
                         src / rel)
                continue
            if skip_manifest and rel == MANIFEST_NAME:
                log.info("publish: not copying %s: a new %s is computed from the copied files", src / rel,
                         MANIFEST_NAME)
                continue
            try:
                st = os.stat(child.path)
            except OSError as e:
                raise PublishError(f"{src / rel}: cannot stat: {e}") from e
            if stat.S_ISDIR(st.st_mode):
                visit(Path(child.path), rel + "/")
            elif stat.S_ISREG(st.st_mode):
                files.append(rel)
                if len(files) > MAX_FILES:
                    raise PublishError(f"{src}: more than {MAX_FILES} files; a checkpoint or adapter has a handful "
                                       f"(shards, index, config), and the watcher refuses larger directories")
            else:
                raise PublishError(f"{src / rel}: not a regular file (a fifo, socket or device?)")

    visit(src, "")
    return files


def _total_size(src: Path, files: list[str]) -> int | None:
    try:
        return sum(os.stat(src / rel).st_size for rel in files)
    except OSError:
        return None  # said by the copy itself


def _check_source_dir(src: Path, files: list[str]) -> None:
    top = [f for f in files if "/" not in f]
    if not any(f.lower().endswith(CHECKPOINT_SUFFIXES) for f in top):
        raise PublishError(f"{src}: no checkpoint in it (expected *.safetensors files, a sharded checkpoint with its "
                           f"index, a save_pretrained output or a PEFT adapter directory); found "
                           f"{', '.join(files[:10]) or 'nothing'}")


def publish(src: PathLike, to: PathLike, *, version: str | None = None, manifest: bool = True,
            link: bool = False) -> Path:
    """Publish ``src`` (a checkpoint file or directory) into the weights folder ``to``; returns the
    published path.

    The entry is named ``version`` (default: the source's own name; a file keeps its suffix, so
    ``--version v3`` of ``model.safetensors`` is ``v3.safetensors``). Publishing always makes the
    entry the newest version: the content of an older version published again is a rollback, and
    an entry of the same name is replaced. A directory gets a ``MANIFEST.json`` listing every file
    with its sha256 and size, named ``version`` (``manifest=False``: copied as it is). ``link=True``
    hard-links the files instead of copying them (same file system only): they share the
    source's inode, so the published version changes if the source is rewritten in place, and a
    linked single file takes the publish time as its modification time; use it only for sources
    that are never written again. Otherwise the source is never modified.
    """
    source = Path(src)
    folder = Path(to)
    try:
        st = os.stat(source)
    except OSError as e:
        raise PublishError(f"{source}: cannot publish: {e}") from e
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise PublishError(f"{source}: not a regular file or a directory")
    name = entry_name(version, source.name, is_dir=is_dir)
    dest = folder / name
    if dest.resolve() == source.resolve():
        raise PublishError(f"{source} is the published entry itself; to publish it again give it another name "
                           f"(--version)")
    if is_dir and folder.resolve().is_relative_to(source.resolve()):
        raise PublishError(f"{folder} is inside the source {source}; publish into a folder outside it")
    files = _source_files(source, skip_manifest=manifest) if is_dir else []
    if is_dir:
        _check_source_dir(source, files)
    started = time.monotonic()
    size = st.st_size if not is_dir else _total_size(source, files)
    nbytes = 0
    with staging(folder, name, directory=is_dir, nbytes=size) as staged:
        if not is_dir:
            _, nbytes = _copy_file(source, staged.temp, digest=False, link=link)
        else:
            entries = []
            for rel in files:
                (staged.temp / rel).parent.mkdir(parents=True, exist_ok=True)
                sha, size = _copy_file(source / rel, staged.temp / rel, digest=manifest, link=link)
                entries.append(ManifestEntry(rel, sha, size))
                nbytes += size
            if manifest:
                (staged.temp / MANIFEST_NAME).write_bytes(render_manifest(entries, version=version or name))
    log.info("published %s as %s (%s, %.1f MB in %.2f s)", source, dest,
             f"{len(files)} files" + (f" + {MANIFEST_NAME}" if manifest else "") if is_dir else "file",
             nbytes / 1e6, time.monotonic() - started)
    return dest


def publish_tensors(tensors: Mapping[str, torch.Tensor], to: PathLike, *, version: str,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` as ``to/<version>.safetensors`` by the same protocol (a training loop's
    checkpoint, published without a copy on disk first); returns the published path.

    Tensors may live on any device. Tensors sharing memory (tied weights) must be given once.
    """
    from safetensors.torch import save_file

    name = entry_name(version, f"{version}.safetensors", is_dir=False)
    with staging(to, name) as staged:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(staged.temp),
                  metadata=dict(metadata or {}))
    return staged.final
