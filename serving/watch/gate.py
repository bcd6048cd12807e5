"""The completeness gate: whether an inspected entry is read now, waited for, or refused.

The publish protocol's rules (:func:`serving.publish.protocol.completeness`) applied to what the
debouncer knows of an entry (renamed in, closed by its writer, unchanged for how long) and to the
cheap completeness check of :mod:`serving.watch.entries`. A decision goes back to the debouncer
(look again later) or to the installer (handled: refused, or kept for installing).
"""

from __future__ import annotations

from serving.publish.protocol import Decision, Observation, completeness
from serving.watch.debounce import Debouncer
from serving.watch.entries import Entry, age_s, check_complete
from serving.watch.install import Installer
from serving.weights import CheckpointPolicy


class Gate:
    """Decides on entries for the watcher's worker (under its lock)."""

    def __init__(self, events: Debouncer, installer: Installer, policy: CheckpointPolicy, debounce_s: float,
                 settle_s: float) -> None:
        self._events = events
        self._installer = installer
        self._policy = policy
        self.debounce_s = debounce_s
        self.settle_s = settle_s

    def initial(self, entry: Entry, now: float) -> bool:
        """At startup: whether ``entry``, unchanged over a debounce interval, is complete (True: install it)."""
        obs = Observation(stable=True, age_s=age_s(entry.fp),
                          problem=entry.problem or check_complete(entry, self._policy))
        return self._decide(entry, completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s), now)

    def due(self, entry: Entry, now: float) -> bool:
        """Whether an entry the debouncer says is due is complete (True: install it)."""
        if entry.problem is not None:  # found by inspecting it (outside the folder, too many files...): final
            return self._decide(entry, Decision("ready", problem=entry.problem), now)
        p = self._events.get(entry.name)
        assert p is not None  # due, so pending
        stable = self._events.settled(entry.name, entry.fp, now)
        if not (p.renamed_in or p.closed) and not stable and age_s(entry.fp) < self.settle_s:
            return self._decide(entry, Decision("wait", max(self.debounce_s, 0.01)), now)
        obs = Observation(renamed_in=p.renamed_in, closed=p.closed, stable=True,
                          age_s=age_s(entry.fp), problem=check_complete(entry, self._policy))
        return self._decide(entry, completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s), now)

    def _decide(self, entry: Entry, decision: Decision, now: float) -> bool:
        """Act on ``decision``: look at the entry again later, or mark it handled and either refuse it or
        keep it for installing (True)."""
        if decision.action == "wait":
            self._events.look_again(entry.name, now, at=now + decision.recheck_in_s)
            return False
        handled = self._events.forget(entry.name)
        if handled is not None:
            entry.first_event = handled.first_event
        self._installer.mark_handled(entry)
        entry.problem = decision.problem
        if entry.problem is not None:
            self._installer.reject(entry, *entry.problem)
            return False
        return True
