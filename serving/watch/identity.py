"""Content identity of the weights the watcher installs: what makes two versions the same weights.

An entry's identity is its content hash: a verified manifest's, else a hash over its files
(:func:`content_hash`); weights merged from a base and an adapter have :func:`merged_hash`. With it
the coordinator turns a version it has seen into a no-op or a rollback without reading it, and the
ledger refuses bytes it refused before.

Hashing costs a read of every byte, so :class:`Identities` decides when: small entries, and
entries whose :func:`quick_identity` is that of weights it knows, are hashed before they are read;
a large checkpoint it has not seen is read first (once, on the path to serving) and hashed after
it went live, on a thread of its own, or at once when it was refused (so the ledger knows it).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving.background import lower_priority
from serving.metrics import HotswapMetrics
from serving.publish.protocol import is_temp_name, tree_hash
from serving.watch.entries import Entry

log = logging.getLogger("serving.watch")

HASH_READ_BYTES = 4 << 20
#: content hashes are computed over chunks of this size, in parallel
CONTENT_CHUNK = 16 << 20
#: checkpoints up to this size are hashed before they are read; larger ones, whose content the watcher has
#: not seen before (by :func:`quick_identity`), are hashed after they went live (read once on the critical path)
PREHASH_MAX_BYTES = 256 << 20
#: bytes read per sample of :func:`quick_identity`
QUICK_BLOCK = 1 << 20
#: quick identities remembered (with the content hash they turned out to have)
QUICK_IDS_KEPT = 64


def merged_hash(base_hash: str | None, adapter_hash: str | None, scale: float) -> str | None:
    """Content hash of base weights with an adapter merged at ``scale`` (None if either is unknown)."""
    if base_hash is None or adapter_hash is None:
        return None
    return hashlib.sha256(f"{base_hash}|lora:{adapter_hash}|scale:{scale!r}".encode()).hexdigest()


def content_hash_file(path: Path, pool: ThreadPoolExecutor | None = None) -> str:
    """A file's content identity: sha256 over its size and the sha256 of each 16 MiB chunk.

    The chunks are hashed in parallel (hashlib releases the GIL), so a large checkpoint costs a
    fraction of a serial sha256 on the path from publish to serving.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        fd = f.fileno()

        def chunk(i: int) -> bytes:
            h = hashlib.sha256()
            pos, end = i * CONTENT_CHUNK, min(size, (i + 1) * CONTENT_CHUNK)
            while pos < end:
                data = os.pread(fd, min(HASH_READ_BYTES, end - pos), pos)
                if not data:
                    raise OSError(f"{path}: shorter than its size while hashing (truncated meanwhile?)")
                h.update(data)
                pos += len(data)
            return h.digest()

        n = max(1, -(-size // CONTENT_CHUNK))
        digests = list(pool.map(chunk, range(n))) if pool is not None and n > 1 else [chunk(i) for i in range(n)]
    top = hashlib.sha256(f"chunks:{CONTENT_CHUNK}:{size}\n".encode())
    for d in digests:
        top.update(d)
    return top.hexdigest()


def _files(entry: Entry) -> list[tuple[str, int]]:
    """(relative path, size) of the regular files of a directory entry, temp names left out."""
    return [(r[0], r[1]) for r in entry.fp.rows
            if r[0] and not r[0].endswith("/") and not any(is_temp_name(p) for p in r[0].split("/"))]


def quick_identity(entry: Entry) -> str:
    """A cheap fingerprint of the entry's content (names, sizes, and nine 1 MiB samples of each file).

    Equal content always has an equal quick identity; different content almost always has a
    different one. The watcher uses it only to decide whether the full hash is needed before a
    checkpoint is read (content it has seen: a no-op or a rollback) or can wait until after.
    """
    h = hashlib.sha256(f"quick:{QUICK_BLOCK}\n".encode())
    files = _files(entry) if entry.is_dir else [("", entry.fp.total_size)]
    for rel, size in files:
        h.update(f"{rel}:{size}\n".encode())
        with open(entry.path / rel if rel else entry.path, "rb") as f:
            for i in range(9):
                offset = min(max(0, size - QUICK_BLOCK), size * i // 8)
                h.update(os.pread(f.fileno(), QUICK_BLOCK, offset))
    return h.hexdigest()


def content_hash(entry: Entry, pool_for: Callable[[int], ThreadPoolExecutor | None]) -> str:
    """The entry's identity: the verified manifest's, else the hash of its file (or of its tree).
    ``pool_for(size)`` gives the threads to hash a file of ``size`` bytes with (None: serially)."""
    if entry.content_hash is not None:
        return entry.content_hash
    if not entry.is_dir:
        return content_hash_file(entry.path, pool_for(entry.fp.total_size))
    return tree_hash([(rel, content_hash_file(entry.path / rel, pool_for(size))) for rel, size in _files(entry)])


class Identities:
    """When the watcher hashes what it installs, and the threads that do it.

    ``lock`` is the watcher's (an entry is re-inspected and its hash recorded under it);
    ``unchanged(entry)`` says whether the entry on disk is still the one inspected;
    ``went_live_hashed(version, hash)`` hands the identity of weights hashed after they went live on.
    """

    def __init__(self, folder: Path, lock: threading.RLock, metrics: HotswapMetrics, *,
                 unchanged: Callable[[Entry], bool], went_live_hashed: Callable[[str, str], None],
                 prehash_max_bytes: int = PREHASH_MAX_BYTES) -> None:
        self.folder = folder
        self.prehash_max_bytes = prehash_max_bytes
        self._lock = lock
        self._metrics = metrics
        self._unchanged = unchanged
        self._went_live_hashed = went_live_hashed
        self._quick_ids: collections.OrderedDict[str, str] = collections.OrderedDict()  # quick -> full hash
        self._pool: ThreadPoolExecutor | None = None
        self._after: ThreadPoolExecutor | None = None  # content hashes of weights already live
        self._identifying = 0

    @property
    def busy(self) -> bool:
        """Hashing weights that already went live."""
        return self._identifying > 0

    def before_read(self, entry: Entry, known: Callable[[Entry], Collection[str | None]]) -> str | None:
        """Hash ``entry`` now (setting ``entry.content_hash``) unless it is a large checkpoint whose quick
        identity is not that of content in ``known(entry)`` (the weights the coordinator can switch to without
        reading, content refused before at this path). Returns the quick identity taken, if one was.
        Raises ``OSError`` (``FileNotFoundError`` when it is gone)."""
        quick: str | None = None
        if entry.content_hash is None and entry.kind == "checkpoint" and entry.fp.total_size > self.prehash_max_bytes:
            quick = quick_identity(entry)
        seen = self._quick_ids.get(quick) if quick is not None else None
        if quick is None or (seen is not None and seen in known(entry)):
            entry.content_hash = content_hash(entry, self._pool_for)
        return quick

    def after_read(self, entry: Entry, *, went_live: bool, quick: str | None) -> None:
        """Identify an entry read without a hash: after it went live on a thread of its own (the worker goes on
        with the next publish meanwhile), at once when it was refused (so the ledger knows this content)."""
        if not went_live:
            self._identify(entry, quick, went_live=False)
            return
        if self._after is None:
            self._after = ThreadPoolExecutor(1, thread_name_prefix=f"hotswap-identity-{self.folder.name}",
                                             initializer=lower_priority)
        self._identifying += 1

        def run() -> None:
            try:
                self._identify(entry, quick, went_live=True)
            except Exception:
                log.exception("weights watcher: hashing %s after it went live failed", entry.path)
                self._metrics.watcher_error()
            finally:
                with self._lock:  # the worker counts up under it too
                    self._identifying -= 1

        self._after.submit(run)

    def close(self) -> None:
        """Stop the hashing threads (pending hashes of live weights are dropped)."""
        if self._after is not None:
            self._after.shutdown(wait=True, cancel_futures=True)
            self._after = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _pool_for(self, size: int) -> ThreadPoolExecutor | None:
        """Threads for hashing large files (None for small ones: not worth a thread)."""
        if size <= CONTENT_CHUNK:
            return None
        if self._pool is None:
            workers = max(1, min(8, (os.cpu_count() or 1)))
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"hotswap-hash-{self.folder.name}",
                                            initializer=lower_priority)
        return self._pool

    def _identify(self, entry: Entry, quick: str | None, *, went_live: bool) -> None:
        """The content hash of an entry read without one: the identity later publishes are compared with
        (no-op, rollback, refused before). Stays unknown when the entry changed meanwhile."""
        t0 = time.perf_counter()
        try:
            h = content_hash(entry, self._pool_for)
        except OSError as e:
            log.info("weights folder: %s could not be hashed after it was read (%s); its identity stays unknown",
                     entry.path, e)
            return
        with self._lock:
            if not self._unchanged(entry):
                return
            entry.content_hash = h
            if quick is not None:
                self._quick_ids[quick] = h
                while len(self._quick_ids) > QUICK_IDS_KEPT:
                    self._quick_ids.popitem(last=False)
            if went_live:
                self._went_live_hashed(entry.version, h)
                log.info("weights folder: %s hashed after it went live (%.0f ms)", entry.version,
                         1e3 * (time.perf_counter() - t0))
