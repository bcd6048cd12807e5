"""The weights watcher: queue, debounce, completeness gate and install order.

One :class:`WeightsWatcher` per engine. The observer (:mod:`serving.watch.observer`) only puts
events on a queue; a single worker thread debounces them, coalesces (of several versions waiting,
the newest by publish time is installed and the others are counted as ``skipped``), checks
completeness (:func:`serving.publish.protocol.completeness` over :mod:`serving.watch.entries`), hashes the
content, and hands the entry to the lineage (:mod:`serving.watch.lineage`), which reads, merges
LoRA adapters and calls the coordinator.

Nothing here deletes or modifies a file in the folder. Every error inside the worker or the event
handler is caught, logged and counted (``hotswap_watcher_errors_total``); it never stops the
watcher. Refused entries are counted as ``hotswap_refits_total{outcome="rejected",reason=...}``,
logged once, and recorded in a ledger so they are not read again until they change.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from serving.choices import DEBOUNCE_BOUNDS, POLL_INTERVAL_BOUNDS, WATCH_MODES, Bounds
from serving.errors import ConfigError
from serving.metrics import HotswapMetrics
from serving.publish.protocol import Observation, completeness, is_temp_name
from serving.refit import RefitCoordinator, RefitReport
from serving.watch.debounce import Debouncer
from serving.watch.entries import DEFAULT_MAX_FILES, Entry, age_s, check_complete, inspect_entry
from serving.watch.identity import PREHASH_MAX_BYTES, Identities
from serving.watch.ledger import Fingerprint, RejectedLedger, Rejection
from serving.watch.lineage import Lineage, entry_key
from serving.watch.observer import FolderObserver, FsEvent
from serving.watch.selection import Candidate, select_versions
from serving.weights import CheckpointPolicy

if TYPE_CHECKING:
    from serving.settings import ServingSettings

log = logging.getLogger("serving.watch")

_STOP = object()
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


class WeightsWatcher:
    """Watch ``folder`` and install what is published there into ``coordinator``.

    ``install_initial()`` (synchronous, at startup) then ``start()``; ``stop()`` at shutdown.
    See ``docs/publish.md`` for the rules users follow and this class applies.
    """

    def __init__(self, folder: Path, coordinator: RefitCoordinator, *, mode: str = "inotify",
                 poll_interval_s: float = 1.0, debounce_s: float = 0.2, metrics: HotswapMetrics | None = None,
                 lora_scale: float = 1.0, checkpoint_policy: CheckpointPolicy | None = None,
                 settle_s: float = 2.0, max_files: int = DEFAULT_MAX_FILES,
                 prehash_max_bytes: int = PREHASH_MAX_BYTES) -> None:
        if mode not in WATCH_MODES:
            raise ConfigError(f"watch_mode {mode!r}: choose one of {WATCH_MODES}")
        bounds = ((poll_interval_s, "poll_interval_s", POLL_INTERVAL_BOUNDS),
                  (debounce_s, "debounce_s", DEBOUNCE_BOUNDS),
                  (settle_s, "settle_s", Bounds(minimum=0)), (max_files, "max_files", Bounds(minimum=1)))
        problems = [f"{name}={value} ({p})" for value, name, rule in bounds for p in rule.problems(value)]
        if problems:
            raise ConfigError(f"invalid watcher timing: {', '.join(problems)}")
        self.folder = Path(os.path.abspath(folder))
        self._folder_str = str(self.folder)
        self.coordinator = coordinator
        self.mode = mode
        self.poll_interval_s = float(poll_interval_s)
        self.debounce_s = float(debounce_s)
        self.settle_s = float(settle_s)
        self.max_files = max_files
        self.metrics = metrics or coordinator.metrics
        self.lora_scale = float(lora_scale)
        policy = checkpoint_policy or coordinator.checkpoint_policy
        if policy.root is None:
            policy = dataclasses.replace(policy, root=self.folder)
        self.policy = policy

        self._queue: queue.Queue[object] = queue.Queue()
        self._stop_event = threading.Event()
        self._lock = threading.RLock()  # the worker's state; held while handling a batch
        self._observer: FolderObserver | None = None
        self._worker: threading.Thread | None = None
        self._busy = False
        self._events = Debouncer(self._folder_str, self.debounce_s)
        self._seen: dict[str, Fingerprint] = {}
        self._ignored_logged: set[str] = set()
        self._ledger = RejectedLedger()
        self._lineage = Lineage(coordinator, self.metrics, policy, self.lora_scale, self._rejected)
        self._identities = Identities(self.folder, self._lock, self.metrics, unchanged=self._on_disk_unchanged,
                                      went_live_hashed=self._lineage.identify, prehash_max_bytes=prehash_max_bytes)
        self.history: collections.deque[WatchRecord] = collections.deque(maxlen=256)

    @classmethod
    def from_settings(cls, settings: ServingSettings, coordinator: RefitCoordinator,
                      metrics: HotswapMetrics | None = None) -> WeightsWatcher:
        """The watcher a served model's settings describe."""
        policy = CheckpointPolicy(allow_pickle=settings.allow_pickle, max_bytes=settings.max_file_bytes,
                                  root=settings.weights_dir)
        return cls(settings.weights_dir, coordinator, mode=settings.watch_mode,
                   poll_interval_s=settings.poll_interval_s, debounce_s=settings.debounce_s,
                   metrics=metrics, lora_scale=settings.lora_scale, checkpoint_policy=policy)

    # ------------------------------------------------------------------ public
    @property
    def rejected(self) -> Mapping[str, str]:
        """Entries refused and not changed since: path -> reason."""
        return MappingProxyType(self._ledger.reasons())

    def rejection(self, path: str | Path) -> Rejection | None:
        """The full record (reason, message, fingerprint) of a refused entry."""
        return self._ledger.get(str(path))

    @property
    def pending(self) -> tuple[str, ...]:
        """Names with events not handled yet (debouncing, or waiting to be complete)."""
        return self._events.names

    @property
    def base_version(self) -> str | None:
        """The full checkpoint LoRA adapters are merged into."""
        return self._lineage.base.version if self._lineage.base is not None else None

    @property
    def adapter_version(self) -> str | None:
        """The adapter merged into the live weights, if any."""
        return self._lineage.adapter.version if self._lineage.adapter is not None else None

    def status(self) -> dict[str, object]:
        """A summary for status pages."""
        return {
            "folder": self._folder_str, "mode": self.mode,
            "watching": self._observer is not None and self._observer.watching,
            "live": self.coordinator.live_version, "base": self.base_version,
            "adapter": self.adapter_version, "pending": list(self.pending),
            "rejected": self._ledger.reasons(),
        }

    def install_initial(self) -> RefitReport | None:
        """Install what the folder holds now: the newest valid base checkpoint by publish time (the
        time it arrived in the folder, ties by name), skipping rejected ones, then the newest valid LoRA adapter
        published after that base, merged into it. ``None`` when nothing valid is there.

        Entries that still look like a copy in progress are left to the worker (:meth:`start`).
        """
        with self._lock:
            if not self.folder.is_dir():
                log.warning("weights folder %s does not exist (yet); nothing to install", self.folder)
                return None
            found: list[Entry] = []
            for name in self._list_names():
                entry = self._inspect_safely(name)
                if entry is not None and self._ledger.lookup(str(entry.path), entry.fp) is None:
                    found.append(entry)
            # entries written less than a debounce interval ago: look again once, they must not change
            young = [e for e in found if e.problem is None and age_s(e.fp) < self.debounce_s]
            young_ids = {id(e) for e in young}
            if young:
                time.sleep(max(0.0, self.debounce_s - min(age_s(e.fp) for e in young)))
            now = time.monotonic()
            entries: list[Entry] = []
            for entry in found:
                if id(entry) in young_ids:
                    again = self._inspect_safely(entry.name)
                    if again is None:
                        continue
                    if again.fp != entry.fp:  # still being written: the worker takes it from here
                        self._events.look_again(entry.name, now)
                        continue
                obs = Observation(stable=True, age_s=age_s(entry.fp),
                                  problem=entry.problem or check_complete(entry, self.policy))
                decision = completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s)
                if decision.action == "wait":
                    self._events.look_again(entry.name, now, at=now + decision.recheck_in_s)
                    continue
                self._seen[entry.name] = entry.fp
                if decision.problem is not None:
                    self._reject_entry(entry, *decision.problem)
                    continue
                entries.append(entry)
            installed = [r for r in self._install_batch(entries, runtime=False) if r.ok]
            return installed[-1] if installed else None

    def start(self) -> None:
        """Start the observer and the worker; entries published since install_initial() are picked up."""
        if self._worker is not None:
            raise RuntimeError("the watcher is already started")
        self._stop_event.clear()
        self._queue = queue.Queue()  # nothing left over from an earlier run; the rescan below covers it
        self._observer = FolderObserver(self._folder_str, self.mode, self.poll_interval_s,
                                        on_event=self._queue.put, on_error=self.metrics.watcher_error,
                                        describe_live=lambda: self.coordinator.live_version)
        with self._lock:
            self._observer.start()
            self._rescan()
        self._worker = threading.Thread(target=self._run, name=f"hotswap-watch-{self.folder.name}", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and the observer; waits up to ``timeout`` seconds for each."""
        self._stop_event.set()
        deadline = time.monotonic() + timeout
        observer, worker = self._observer, self._worker
        if worker is not None:
            self._queue.put(_STOP)
        if observer is not None:
            observer.stop()
        if worker is not None:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("weights watcher: worker still busy after %.1fs (a refit in progress?)", timeout)
        if observer is not None:
            observer.join(max(0.0, deadline - time.monotonic()))
        if worker is None or not worker.is_alive():
            self._identities.close()
        self._observer = self._worker = None

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued, nothing is pending and the worker is not handling anything."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0 and not self._events and not self._busy and not self._identities.busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def clear_adapter(self) -> RefitReport | None:
        """Remove the live LoRA adapter: reinstall the pristine base weights (None if no adapter)."""
        with self._lock:
            return self._lineage.clear_adapter()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            try:
                item: object | None = self._queue.get(timeout=self._wait_timeout())
            except queue.Empty:
                item = None
            items = [] if item is None else [item]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(it is _STOP for it in items)
            try:
                with self._lock:
                    self._busy = True
                    if not stop:
                        for it in items:
                            self._absorb_safely(it)
                        self._supervise()
                        self._process_due()
            except Exception:
                log.exception("weights watcher: unexpected error; the watcher keeps running")
                self.metrics.watcher_error()
            finally:
                self._busy = False
                for _ in items:
                    self._queue.task_done()
            if stop or self._stop_event.is_set():
                return

    def _supervise(self, force: bool = False) -> None:
        if self._observer is not None and self._observer.supervise(force):
            self._rescan()

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        interval = self._observer.check_interval_s if self._observer is not None else 1.0
        return max(0.001, self._events.next_due(now, now + interval) - now)

    def _absorb_safely(self, item: object) -> None:
        try:
            if isinstance(item, FsEvent):
                absorbed = self._events.absorb(item)
                if absorbed.folder_deleted:
                    self._supervise(force=True)
                for name in absorbed.gone:
                    self._gone(name)
        except Exception:
            log.exception("weights watcher: could not handle event %r", item)
            self.metrics.watcher_error()

    def _gone(self, name: str) -> None:
        self._events.forget(name)
        self._seen.pop(name, None)
        self._ledger.forget(str(self.folder / name))

    def _rescan(self) -> None:
        now = time.monotonic()
        for name in self._list_names():
            self._events.look_again(name, now)

    def _list_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._folder_str) if not is_temp_name(n))
        except OSError as e:
            log.warning("weights folder %s cannot be listed: %s", self.folder, e)
            return []

    # ------------------------------------------------------------------ inspection
    def _inspect_safely(self, name: str) -> Entry | None:
        try:
            return self._inspect(name)
        except Exception:
            log.exception("weights watcher: inspecting %s failed", self.folder / name)
            self.metrics.watcher_error()
            return None

    def _inspect(self, name: str) -> Entry | None:
        """The entry ``name`` is now; None when it is gone or not a checkpoint (logged once)."""
        found = inspect_entry(self.folder, name, self.policy, self.max_files)
        if found == "gone":
            self._gone(name)
            return None
        if found == "ignored" and name not in self._ignored_logged:
            self._ignored_logged.add(name)
            log.info("weights folder: ignoring %s (not a checkpoint: expected a .safetensors file, a "
                     "checkpoint directory or a PEFT adapter directory)", self.folder / name)
        return found if isinstance(found, Entry) else None

    def _on_disk_unchanged(self, entry: Entry) -> bool:
        """The entry in the folder is still the one inspected (no side effect when it is not)."""
        again = inspect_entry(self.folder, entry.name, self.policy, self.max_files)
        return isinstance(again, Entry) and again.fp == entry.fp

    # ------------------------------------------------------------------ processing
    def _process_due(self) -> None:
        now = time.monotonic()
        due = self._events.due(now)
        entries: list[Entry] = []
        for name in due:
            try:
                entry = self._gate(name, now)
            except Exception:
                log.exception("weights watcher: checking %s failed", self.folder / name)
                self.metrics.watcher_error()
                self._events.forget(name)
                continue
            if entry is not None:
                entries.append(entry)
        if entries:
            self._install_batch(entries, runtime=True)

    def _gate(self, name: str, now: float) -> Entry | None:
        """Decide on one due entry: drop it, wait for it, reject it, or return it for installing."""
        entry = self._inspect(name)
        if entry is None:
            self._events.forget(name)
            return None
        if self._seen.get(name) == entry.fp or self._ledger.lookup(str(entry.path), entry.fp) is not None:
            self._events.forget(name)  # handled already, unchanged since
            return None
        if entry.problem is None:
            p = self._events.get(name)
            assert p is not None  # due, so pending
            stable = self._events.settled(name, entry.fp, now)
            if not (p.renamed_in or p.closed) and not stable and age_s(entry.fp) < self.settle_s:
                self._events.recheck(name, now + max(self.debounce_s, 0.01))
                return None
            obs = Observation(renamed_in=p.renamed_in, closed=p.closed, stable=True,
                              age_s=age_s(entry.fp), problem=check_complete(entry, self.policy))
            decision = completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s)
            if decision.action == "wait":
                self._events.recheck(name, now + decision.recheck_in_s)
                return None
            entry.problem = decision.problem
        handled = self._events.forget(name)
        self._seen[name] = entry.fp
        if entry.problem is not None:
            self._reject_entry(entry, *entry.problem)
            return None
        entry.first_event = handled.first_event if handled is not None else None
        return entry

    def _install_batch(self, entries: list[Entry], *, runtime: bool) -> list[RefitReport]:
        """Install the newest of ``entries`` (see :func:`select_versions`); at runtime, never an entry
        published before the live base (or adapter): the restart rule must pick the same version."""
        reports: list[RefitReport] = []
        adapters_enabled = self.lora_scale != 0.0
        if not adapters_enabled:
            for e in entries:
                if e.kind == "adapter":
                    log.info("weights folder: adapter %s ignored (lora_scale is 0: adapters are off)", e.path)
        if runtime:
            older = [e for e in entries if self._lineage.older_than_live(e)]
            if older:
                self.metrics.count_refit("skipped", "older_than_live", len(older))
                log.info("weights folder: not installing %s: it arrived before the live %s; to publish an "
                         "older version again, copy it in anew or touch it", ", ".join(e.name for e in older),
                         self.coordinator.live_version)
                entries = [e for e in entries if e not in older]
        by_name = {e.name: e for e in entries}

        def attempt(c: Candidate) -> str:
            entry = by_name[c.name]
            try:
                result, report = self._attempt(entry)
            except Exception:
                log.exception("weights watcher: installing %s failed unexpectedly", entry.path)
                self.metrics.watcher_error()
                self._seen.pop(entry.name, None)
                return "stop"
            if report is not None:
                reports.append(report)
            return result

        candidates = [Candidate(e.name, e.kind, entry_key(e)) for e in entries]
        selection = select_versions(candidates, attempt, adapters_enabled=adapters_enabled)
        if runtime and selection.skipped:
            self.metrics.count_refit("skipped", "superseded", len(selection.skipped))
            log.info("weights folder: skipped %d older version(s) published in the same burst: %s",
                     len(selection.skipped), ", ".join(sorted(c.name for c in selection.skipped)[:10]))
        return reports

    def _attempt(self, entry: Entry) -> tuple[str, RefitReport | None]:
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            quick = self._identities.before_read(entry, self._known_hashes)
        except FileNotFoundError:
            self._gone(entry.name)
            return "rejected", None
        except OSError as e:
            report = self._reject_entry(entry, "unreadable", f"{entry.path}: cannot read: {e}")
            return "rejected", report
        hash_s = time.perf_counter() - t0
        # the entry must still be what was hashed (a write during hashing means: not complete)
        if not self._unchanged(entry):
            return "rejected", None
        if entry.content_hash is not None and \
                self._ledger.lookup_hash(str(entry.path), entry.fp, entry.content_hash) is not None:
            log.debug("weights folder: %s has content refused before; not read again", entry.path)
            return "rejected", None
        self._ledger.forget(str(entry.path))  # changed since it was refused: judged afresh
        if entry.kind == "adapter":
            report = self._lineage.apply_adapter(entry)
        else:
            report = self._lineage.install_checkpoint(entry)
        hashed_after = entry.content_hash is None
        if hashed_after:
            self._identities.after_read(entry, went_live=report.outcome == "success", quick=quick)
        record = WatchRecord(str(entry.path), entry.kind, entry.version, entry.first_event, started,
                             time.monotonic(), hash_s, report, hashed_after)
        self.history.append(record)
        log.info("%s", record.summary())
        if report.outcome in ("success", "noop"):
            return "ok", report
        if report.outcome == "failed":  # the engine's fault, not the file's: retry when it changes
            self._seen.pop(entry.name, None)
            return "stop", report
        self._ledger.record(Rejection(str(entry.path), entry.fp, entry.content_hash, report.reason, report.message))
        return "rejected", report

    def _known_hashes(self, entry: Entry) -> set[str | None]:
        """Content the coordinator can switch to without reading (live: a no-op; previous: a pointer switch;
        the base under an adapter), and content refused before at this path."""
        coord = self.coordinator
        known = {w.content_hash for w in (coord.live, coord.previous, self._lineage.base) if w is not None}
        refused = self._ledger.get(str(entry.path))
        if refused is not None:
            known.add(refused.content_hash)
        return known

    def _unchanged(self, entry: Entry) -> bool:
        """Still what was inspected; if not, it is being written: drop it and look again later."""
        again = self._inspect(entry.name)
        if again is not None and again.fp == entry.fp:
            return True
        self._seen.pop(entry.name, None)
        self._events.look_again(entry.name, time.monotonic())
        return False

    def _reject_entry(self, entry: Entry, reason: str, message: str) -> RefitReport:
        """Refuse an entry without handing it to the coordinator: count, log once, record."""
        self._ledger.record(Rejection(str(entry.path), entry.fp, entry.content_hash, reason, message))
        return self._rejected(entry.version, reason, message)

    def _rejected(self, version: str, reason: str, message: str) -> RefitReport:
        live = self.coordinator.live_version
        self.metrics.count_refit("rejected", reason)
        shown = message if len(message) <= _LOG_CHARS else message[:_LOG_CHARS] + " ..."
        log.warning("weights folder: rejected %s (%s): %s -- serving continues on %s; not retried until it "
                    "changes", version, reason, shown, live)
        return RefitReport("rejected", version, live, {}, reason, message)
