"""What the watcher does with complete entries: install the newest, and account for every outcome.

:class:`Installer` picks which of a batch to install (:mod:`serving.watch.selection`), hashes it
when that can save a read (:mod:`serving.watch.identity`), hands it to the lineage
(:mod:`serving.watch.lineage`: read, LoRA merge, coordinator), and records what happened: a
refusal is counted as ``hotswap_refits_total{outcome="rejected",reason=...}``, logged once and
kept in the ledger (:mod:`serving.watch.ledger`) so it is not read again until it changes; every
attempt is a :class:`WatchRecord` in :attr:`Installer.history`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.metrics import HotswapMetrics
from serving.refit import RefitCoordinator, RefitReport
from serving.watch.entries import Entry, inspect_entry
from serving.watch.identity import Identities
from serving.watch.ledger import Fingerprint, RejectedLedger, Rejection
from serving.watch.lineage import Lineage, entry_key
from serving.watch.outcome import EntryOutcome, being_written, ignored, rejected
from serving.watch.selection import Candidate, select_versions
from serving.weights import CheckpointPolicy

log = logging.getLogger("serving.watch")

_LOG_CHARS = 800  # longer messages are cut in the log (the ledger keeps them whole)


@dataclass(frozen=True)
class WatchRecord:
    """One entry the worker tried to install, with its timings (``time.monotonic()`` clock)."""

    path: str
    kind: str
    version: str
    #: the first filesystem event of this publish (None: found by a scan)
    first_event: float | None
    #: when the worker started on it (after debounce and completeness checks)
    started: float
    finished: float
    hash_s: float
    report: RefitReport
    #: the content hash is computed after the weights went live, off the worker (large, new content)
    hashed_after: bool = False

    def summary(self) -> str:
        """One line for the log: the outcome, the time from the first event, and where it went (ms)."""
        r = self.report
        parts = []
        if self.first_event is not None:
            parts.append(f"settle {1e3 * max(0.0, self.started - self.first_event):.0f}")
        parts.append(f"hash {1e3 * self.hash_s:.0f}")
        parts += [f"{k} {1e3 * v:.0f}" for k, v in r.stages.items() if k != "total"]
        if self.hashed_after:
            parts.append("hashed after going live")
        since = self.first_event if self.first_event is not None else self.started
        return (f"refit {self.version} -> {r.outcome}{f' ({r.reason})' if r.reason else ''} in "
                f"{1e3 * (self.finished - since):.0f} ms from the first event "
                f"({', '.join(parts)})")


class Installer:
    """Installs complete entries of ``folder`` into ``coordinator`` and remembers how each was handled.

    Runs on the watcher's worker, under its ``lock``. ``unchanged(entry)`` re-inspects an entry about
    to be read: False when it changed since (the watcher then looks at it again later).
    """

    def __init__(self, folder: Path, coordinator: RefitCoordinator, metrics: HotswapMetrics,
                 policy: CheckpointPolicy, lora_scale: float, lock: threading.RLock, *, max_files: int,
                 prehash_max_bytes: int, unchanged: Callable[[Entry], bool]) -> None:
        self.folder = folder
        self.coordinator = coordinator
        self.metrics = metrics
        self.policy = policy
        self.lora_scale = lora_scale
        self.max_files = max_files
        self._unchanged = unchanged
        self.ledger = RejectedLedger()
        self.lineage = Lineage(coordinator, metrics, policy, lora_scale, self._rejected)
        self.identities = Identities(folder, lock, metrics, unchanged=self._on_disk_unchanged,
                                     went_live_hashed=self.lineage.identify, prehash_max_bytes=prehash_max_bytes)
        self.history: collections.deque[WatchRecord] = collections.deque(maxlen=256)
        self._seen: dict[str, Fingerprint] = {}  # name -> the state it was handled in

    # ------------------------------------------------------------------ what was handled
    def refused(self, entry: Entry) -> bool:
        """Refused before, in the state it is in now."""
        return self.ledger.lookup(str(entry.path), entry.fp) is not None

    def handled(self, entry: Entry) -> bool:
        """Handled before (installed, refused or skipped), in the state it is in now."""
        return self._seen.get(entry.name) == entry.fp or self.refused(entry)

    def mark_handled(self, entry: Entry) -> None:
        self._seen[entry.name] = entry.fp

    def retry(self, name: str) -> None:
        """Handle ``name`` again the next time it is due, even unchanged."""
        self._seen.pop(name, None)

    def forget(self, name: str) -> None:
        """``name`` is gone from the folder: nothing about it is kept."""
        self._seen.pop(name, None)
        self.ledger.forget(str(self.folder / name))

    def reject(self, entry: Entry, reason: str, message: str) -> RefitReport:
        """Refuse an entry without handing it to the coordinator: count, log once, record."""
        self.ledger.record(Rejection(str(entry.path), entry.fp, entry.content_hash, reason, message))
        return self._rejected(entry.version, reason, message)

    # ------------------------------------------------------------------ installing
    def install(self, entries: list[Entry], *, runtime: bool) -> list[EntryOutcome]:
        """Install the newest of ``entries`` (see :func:`select_versions`); at runtime, never an entry
        published before the live base (or adapter): the restart rule must pick the same version.
        Returns what happened to each entry, in the order they were handled."""
        outcomes: list[EntryOutcome] = []
        adapters_enabled = self.lora_scale != 0.0
        if not adapters_enabled:
            for e in entries:
                if e.kind == "adapter":
                    log.info("weights folder: adapter %s ignored (lora_scale is 0: adapters are off)", e.path)
                    outcomes.append(ignored(e.name, "a LoRA adapter, and adapters are off (lora_scale is 0)"))
        if runtime:
            entries = self._drop_older_than_live(entries)
        by_name = {e.name: e for e in entries}

        def attempt(c: Candidate) -> str:
            entry = by_name[c.name]
            try:
                result, outcome = self._attempt(entry)
            except Exception as e:
                log.exception("weights watcher: installing %s failed unexpectedly", entry.path)
                self.metrics.watcher_error()
                self.retry(entry.name)
                outcome = EntryOutcome(entry.name, "failed", "watcher_error", f"{type(e).__name__}: {e}")
                result = "stop"
            outcomes.append(outcome)
            return result

        candidates = [Candidate(e.name, e.kind, entry_key(e)) for e in entries]
        selection = select_versions(candidates, attempt, adapters_enabled=adapters_enabled)
        why = ("a newer entry failed to install (an engine error: older versions are not tried instead)"
               if selection.stopped else "a newer entry was installed, or this one was published before it")
        outcomes += [EntryOutcome(c.name, "skipped", "superseded", why) for c in selection.skipped]
        if runtime and selection.skipped:
            self.metrics.count_refit("skipped", "superseded", len(selection.skipped))
            log.info("weights folder: skipped %d older version(s) published in the same burst: %s",
                     len(selection.skipped), ", ".join(sorted(c.name for c in selection.skipped)[:10]))
        return outcomes

    def _drop_older_than_live(self, entries: list[Entry]) -> list[Entry]:
        older = [e for e in entries if self.lineage.older_than_live(e)]
        if older:
            self.metrics.count_refit("skipped", "older_than_live", len(older))
            log.info("weights folder: not installing %s: it arrived before the live %s; to publish an "
                     "older version again, copy it in anew or touch it", ", ".join(e.name for e in older),
                     self.coordinator.live_version)
        return [e for e in entries if e not in older]

    def _attempt(self, entry: Entry) -> tuple[str, EntryOutcome]:
        """Install one entry: ``"ok" | "rejected" | "stop"`` (see :func:`select_versions`), and what happened."""
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            quick = self.identities.before_read(entry, self._known_hashes)
        except FileNotFoundError:
            self.forget(entry.name)
            log.info("weights folder: %s was deleted before it was read; not installed", entry.path)
            return "rejected", rejected(entry.name, "not_found", f"{entry.path}: deleted before it was read")
        except OSError as e:
            if not self._unchanged(entry):  # truncated or rewritten while hashed: judged again once complete
                return "rejected", being_written(entry.name)
            report = self.reject(entry, "unreadable", f"{entry.path}: cannot read: {e}")
            return "rejected", rejected(entry.name, report.reason, report.message, report)
        hash_s = time.perf_counter() - t0
        # the entry must still be what was hashed (a write during hashing means: not complete)
        if not self._unchanged(entry):
            return "rejected", being_written(entry.name)
        if entry.content_hash is not None and \
                (before := self.ledger.lookup_hash(str(entry.path), entry.fp, entry.content_hash)) is not None:
            log.debug("weights folder: %s has content refused before; not read again", entry.path)
            return "rejected", rejected(entry.name, before.reason, before.message)
        self.ledger.forget(str(entry.path))  # changed since it was refused: judged afresh
        if entry.kind == "adapter":
            report = self.lineage.apply_adapter(entry)
        else:
            report = self.lineage.install_checkpoint(entry)
        hashed_after = entry.content_hash is None
        if hashed_after:
            self.identities.after_read(entry, went_live=report.outcome == "success", quick=quick)
        record = WatchRecord(str(entry.path), entry.kind, entry.version, entry.first_event, started,
                             time.monotonic(), hash_s, report, hashed_after)
        self.history.append(record)
        log.info("%s", record.summary())
        if report.outcome in ("success", "noop"):
            return "ok", EntryOutcome(entry.name, "installed", report=report)
        if report.outcome == "failed":  # the engine's fault, not the file's: retry when it changes
            self.retry(entry.name)
            return "stop", EntryOutcome(entry.name, "failed", report.reason, report.message, report)
        self.ledger.record(Rejection(str(entry.path), entry.fp, entry.content_hash, report.reason, report.message))
        return "rejected", rejected(entry.name, report.reason, report.message, report)

    def _known_hashes(self, entry: Entry) -> set[str | None]:
        """Content the coordinator can switch to without reading (live: a no-op; previous: a pointer switch;
        the base under an adapter), and content refused before at this path."""
        coord = self.coordinator
        known = {w.content_hash for w in (coord.live, coord.previous, self.lineage.base) if w is not None}
        refused = self.ledger.get(str(entry.path))
        if refused is not None:
            known.add(refused.content_hash)
        return known

    def _on_disk_unchanged(self, entry: Entry) -> bool:
        """The entry in the folder is still the one inspected (no side effect when it is not)."""
        again = inspect_entry(self.folder, entry.name, self.policy, self.max_files)
        return isinstance(again, Entry) and again.fp == entry.fp

    def _rejected(self, version: str, reason: str, message: str) -> RefitReport:
        live = self.coordinator.live_version
        self.metrics.count_refit("rejected", reason)
        shown = message if len(message) <= _LOG_CHARS else message[:_LOG_CHARS] + " ..."
        log.warning("weights folder: rejected %s (%s): %s -- serving continues on %s; not retried until it "
                    "changes", version, reason, shown, live)
        return RefitReport("rejected", version, live, {}, reason, message)
