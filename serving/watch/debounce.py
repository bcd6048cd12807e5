"""Which names in the weights folder have news, and when each is due to be looked at.

Pure state, no threads and no I/O: :class:`Debouncer` folds filesystem events into one
:class:`Pending` record per top-level name. A rename into the folder (or a close after writing)
is a complete publish and is due at once; anything written in place waits until it has been quiet
for ``debounce_s``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from serving.publish.protocol import is_temp_name
from serving.watch.ledger import Fingerprint
from serving.watch.observer import FsEvent


@dataclass
class Pending:
    """A name with events the worker has not handled yet."""

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


@dataclass
class Debouncer:
    folder: str
    debounce_s: float
    pending: dict[str, Pending] = field(default_factory=dict)

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
                    self.pending.pop(src[0], None)
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
            self.pending.pop(name, None)
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
        p = self.pending.get(name)
        if p is None:
            p = self.pending[name] = Pending(when, when)
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
        return sorted(n for n, p in self.pending.items() if now >= self.due_at(p))

    def next_due(self, now: float, latest: float) -> float:
        """The earliest due time of any pending name, and no later than ``latest``."""
        return min([latest, *(self.due_at(p) for p in self.pending.values())])
