"""Entries the watcher refused, so that they are not read again until they change.

Pure: a :class:`Fingerprint` (sizes, mtimes, inodes, modes) says whether an entry changed since it
was refused; :class:`RejectedLedger` keeps one :class:`Rejection` per path and also refuses a
changed entry whose content hash is one refused for a reason of the bytes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: reasons that depend on the bytes alone: the same content hash is refused again without reading
CONTENT_REASONS = frozenset({"corrupt", "empty", "invalid", "unsafe_pickle", "manifest_mismatch",
                             "manifest_invalid", "lora_invalid", "lora_mismatch", "canary", "too_large"})


@dataclass(frozen=True)
class Fingerprint:
    """Cheap identity of an entry's state: ``(relative path, size, mtime_ns, inode, mode)`` per file.

    For a file there is one row with path ``""``; for a directory, one row for the directory itself
    and one per file below it. Any write, rename, chmod or added/removed file changes it.
    """

    rows: tuple[tuple[str, int, int, int, int], ...]

    @property
    def total_size(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def newest_mtime_ns(self) -> int:
        return max((r[2] for r in self.rows), default=0)


@dataclass(frozen=True)
class Rejection:
    """Why an entry was refused, and the state it was refused in."""

    path: str
    fingerprint: Fingerprint
    content_hash: str | None
    reason: str
    message: str


@dataclass
class RejectedLedger:
    """Entries refused, keyed by path and the fingerprint (size, mtime, inode, mode) they had.

    An entry is not read again while its fingerprint is unchanged; when it changed (a touch, a
    copy of the same bytes) but its content hash is the refused one and the reason depends on the
    content alone, it is still refused without another read.
    """

    _entries: dict[str, Rejection] = field(default_factory=dict)

    def record(self, rejection: Rejection) -> None:
        self._entries[rejection.path] = rejection

    def lookup(self, path: str, fingerprint: Fingerprint) -> Rejection | None:
        r = self._entries.get(path)
        return r if r is not None and r.fingerprint == fingerprint else None

    def lookup_hash(self, path: str, fingerprint: Fingerprint, content_hash: str | None) -> Rejection | None:
        """Same content already refused for a content reason: re-key it to ``fingerprint`` and return it."""
        r = self._entries.get(path)
        if r is None or content_hash is None or r.content_hash != content_hash or r.reason not in CONTENT_REASONS:
            return None
        r = Rejection(path, fingerprint, content_hash, r.reason, r.message)
        self._entries[path] = r
        return r

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)

    def reasons(self) -> dict[str, str]:
        """A snapshot (safe to take while the worker records: ``list(dict.items())`` is atomic)."""
        return {p: r.reason for p, r in list(self._entries.items())}

    def get(self, path: str) -> Rejection | None:
        return self._entries.get(path)

    def __len__(self) -> int:
        return len(self._entries)
