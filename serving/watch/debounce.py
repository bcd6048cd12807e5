"""Which names in the weights folder have news, and when each is due to be looked at.

Pure state, no threads and no I/O: :class:`Debouncer` folds filesystem events into one
:class:`Pending` record per top-level name. A rename into the folder (or a close after writing)
is a complete publish and is due at once; anything written in place waits until it has been quiet
for ``debounce_s``. The debouncer alone writes its records: the watcher reads them
(:meth:`Debouncer.get`) and tells it what it decided through its methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from serving.publish.protocol import is_temp_name
from serving.watch.ledger import Fingerprint
from serving.watch.observer import FsEvent


@dataclass
class Pending:
    """A name with events the worker has not handled yet (written by the :class:`Debouncer` only)."""

    last_event: float
    first_event: float
    renamed_in: bool = False
    closed: bool = False
    recheck_at: float = 0.0
    fp: Fingerprint | None = None
    fp_since: float = 0.0


@dataclass(frozen=True)
class Absorbed:
    """What an event means beyond the pending records: names gone, or the folder itself deleted."""

    gone: tuple[str, ...] = ()
    folder_deleted: bool = False


class Debouncer:
    """The names of ``folder`` with news, and when each is due to be looked at."""

    def __init__(self, folder: str, debounce_s: float) -> None:
        self.folder = folder
        self.debounce_s = debounce_s
        self._pending: dict[str, Pending] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The names pending, sorted (a snapshot: safe to take while the worker absorbs events)."""
        return tuple(sorted(list(self._pending)))

    def __len__(self) -> int:
        return len(self._pending)

    def get(self, name: str) -> Pending | None:
        """The record of ``name`` (to read), or None if nothing is pending for it."""
        return self._pending.get(name)

    def look_again(self, name: str, now: float, *, at: float | None = None) -> None:
        """Have ``name`` looked at as if an event came ``now`` (kept as it is if already pending), and not
        before ``at``."""
        p = self._pending.setdefault(name, Pending(now, now))
        if at is not None:
            p.recheck_at = at

    def recheck(self, name: str, at: float) -> None:
        """Look at ``name`` again at ``at`` (it was due, but is not complete yet)."""
        self._pending[name].recheck_at = at

    def settled(self, name: str, fp: Fingerprint, now: float) -> bool:
        """Whether ``name`` was found with fingerprint ``fp`` a debounce interval ago (unchanged since);
        remembers ``fp`` as seen ``now`` when it differs."""
        p = self._pending[name]
        stable = p.fp == fp and now - p.fp_since >= self.debounce_s
        if p.fp != fp:
            p.fp, p.fp_since = fp, now
        return stable

    def forget(self, name: str) -> Pending | None:
        """Drop ``name`` (handled, or gone); its record, if it had one."""
        return self._pending.pop(name, None)

    def entry_of(self, path: str) -> tuple[str, bool] | None:
        """``(top-level name, whether path is that entry itself)``; None outside the folder or for temp names."""
        if not path:
            return None
        rel = os.path.relpath(os.path.normpath(path), self.folder)
        if rel == "." or rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
            return None
        parts = rel.split(os.sep)
        if is_temp_name(parts[0]):
            return None
        return parts[0], len(parts) == 1

    def absorb(self, ev: FsEvent) -> Absorbed:
        if ev.kind == "deleted" and os.path.normpath(ev.src) == self.folder:
            return Absorbed(folder_deleted=True)
        if ev.kind == "moved":
            gone: tuple[str, ...] = ()
            src, dest = self.entry_of(ev.src), self.entry_of(ev.dest)
            if src is not None and (dest is None or dest[0] != src[0]):
                if src[1]:
                    gone = (src[0],)
                    self.forget(src[0])
                else:
                    self.touch(src[0], ev.when)
            if dest is not None:
                self.touch(dest[0], ev.when, renamed_in=dest[1])
            return Absorbed(gone)
        entry = self.entry_of(ev.src)
        if entry is None:
            return Absorbed()
        name, is_self = entry
        if ev.kind == "deleted" and is_self:
            self.forget(name)
            return Absorbed((name,))
        if ev.kind == "closed":
            self.touch(name, ev.when, closed=is_self, writing=not is_self)
        elif ev.kind == "modified":
            self.touch(name, ev.when, writing=True)
        elif ev.kind == "created":
            self.touch(name, ev.when, writing=is_self)
        else:  # attrib, deletions below the entry
            self.touch(name, ev.when)
        return Absorbed()

    def touch(self, name: str, when: float, *, renamed_in: bool = False, closed: bool = False,
              writing: bool = False) -> None:
        """Record an event on ``name`` at ``when``: a rename into the folder, a close after writing, a write."""
        p = self._pending.get(name)
        if p is None:
            p = self._pending[name] = Pending(when, when)
        p.last_event = max(p.last_event, when)
        p.recheck_at = 0.0  # something happened: look again after the debounce, not at a later recheck
        if writing:  # written in place since: neither an atomic rename nor a finished write
            p.renamed_in = p.closed = False
        if renamed_in:
            p.renamed_in, p.closed = True, False
        if closed:
            p.closed = True

    def due_at(self, p: Pending) -> float:
        """A rename is a complete publish: considered at once. In-place writes wait for the debounce."""
        return max(p.last_event + (0.0 if p.renamed_in else self.debounce_s), p.recheck_at)

    def due(self, now: float) -> list[str]:
        return sorted(n for n, p in self._pending.items() if now >= self.due_at(p))

    def next_due(self, now: float, latest: float) -> float:
        """The earliest due time of any pending name, and no later than ``latest``."""
        return min([latest, *(self.due_at(p) for p in self._pending.values())])
