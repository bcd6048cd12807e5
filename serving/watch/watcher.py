"""The weights watcher: the queue and the worker that ties the watch package together.

One :class:`WeightsWatcher` per engine. The observer (:mod:`serving.watch.observer`) only puts
events on a queue; a single worker thread debounces them (:mod:`serving.watch.debounce`), inspects
each entry due (:mod:`serving.watch.entries`), lets the completeness gate (:mod:`serving.watch.gate`)
decide whether it is read now, and hands the complete ones to the installer
(:mod:`serving.watch.install`), which installs the newest (the others are counted as ``skipped``)
and accounts for every outcome.

Nothing here deletes or modifies a file in the folder. Every error inside the worker or the event
handler is caught, logged and counted (``hotswap_watcher_errors_total``); it never stops the
watcher.
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
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from serving.choices import DEBOUNCE_BOUNDS, POLL_INTERVAL_BOUNDS, WATCH_MODES, Bounds
from serving.errors import ConfigError
from serving.metrics import HotswapMetrics
from serving.publish.protocol import is_temp_name
from serving.refit import RefitCoordinator, RefitReport
from serving.watch import outcome
from serving.watch.debounce import Debouncer
from serving.watch.entries import DEFAULT_MAX_FILES, Entry, age_s, inspect_entry
from serving.watch.gate import Gate
from serving.watch.identity import PREHASH_MAX_BYTES
from serving.watch.install import Installer, WatchRecord
from serving.watch.ledger import Rejection
from serving.watch.observer import FolderObserver, FsEvent
from serving.watch.outcome import EntryOutcome, InitialInstall
from serving.weights import CheckpointPolicy

if TYPE_CHECKING:
    from serving.settings import ServingSettings

log = logging.getLogger("serving.watch")

_STOP = object()


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
        self._ignored_logged: set[str] = set()
        self._installer = Installer(self.folder, coordinator, self.metrics, policy, self.lora_scale, self._lock,
                                    max_files=max_files, prehash_max_bytes=prehash_max_bytes,
                                    unchanged=self._unchanged)
        self._completeness = Gate(self._events, self._installer, policy, self.debounce_s, self.settle_s)
        #: every entry the worker tried to install, newest last
        self.history: collections.deque[WatchRecord] = self._installer.history

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
        return MappingProxyType(self._installer.ledger.reasons())

    def rejection(self, path: str | Path) -> Rejection | None:
        """The full record (reason, message, fingerprint) of a refused entry."""
        return self._installer.ledger.get(str(path))

    @property
    def pending(self) -> tuple[str, ...]:
        """Names with events not handled yet (debouncing, or waiting to be complete)."""
        return self._events.names

    @property
    def base_version(self) -> str | None:
        """The full checkpoint LoRA adapters are merged into."""
        base = self._installer.lineage.base
        return base.version if base is not None else None

    @property
    def adapter_version(self) -> str | None:
        """The adapter merged into the live weights, if any."""
        adapter = self._installer.lineage.adapter
        return adapter.version if adapter is not None else None

    def status(self) -> dict[str, object]:
        """A summary for status pages."""
        return {
            "folder": self._folder_str, "mode": self.mode,
            "watching": self._observer is not None and self._observer.watching,
            "live": self.coordinator.live_version, "base": self.base_version,
            "adapter": self.adapter_version, "pending": list(self.pending),
            "rejected": self._installer.ledger.reasons(),
        }

    def install_initial(self) -> InitialInstall:
        """Install what the folder holds now: the newest valid base checkpoint by publish time (the time it arrived
        in the folder, ties by name), skipping rejected ones, then the newest valid LoRA adapter published after that
        base, merged into it. The result's ``report`` is None when nothing valid is there; its ``entries`` say what
        happened to every name in the folder. Entries that still look like a copy in progress are left to the
        worker (:meth:`start`)."""
        with self._lock:
            if not self.folder.is_dir():
                log.warning("weights folder %s does not exist (yet); nothing to install", self.folder)
                return InitialInstall(self._folder_str, None, missing=True)
            outcomes: dict[str, EntryOutcome] = {}
            found = self._initial_entries(outcomes)
            now = time.monotonic()
            entries = []
            for e in found:
                if self._completeness.initial(e, now):
                    entries.append(e)
                else:
                    outcomes[e.name] = self._refused_or_waiting(e)
            installed = self._installer.install(entries, runtime=False)
            outcomes.update((o.name, o) for o in installed)
            reports = [o.report for o in installed if o.outcome == "installed" and o.report is not None]
            return InitialInstall(self._folder_str, reports[-1] if reports else None, tuple(outcomes.values()))

    def _refused_or_waiting(self, entry: Entry) -> EntryOutcome:
        refusal = self._installer.ledger.lookup(str(entry.path), entry.fp)
        if refusal is not None:
            return outcome.rejected(entry.name, refusal.reason, refusal.message)
        return outcome.being_written(entry.name)

    def _initial_entries(self, outcomes: dict[str, EntryOutcome]) -> list[Entry]:
        """The entries in the folder not refused before, unchanged over a debounce interval (entries written less
        than one ago are looked at once more; one that changed meanwhile is left to the worker). What is not
        returned gets its outcome in ``outcomes``."""
        found: list[Entry] = []
        for name in self._list_names(temp=True):
            if is_temp_name(name):
                outcomes[name] = outcome.ignored(name, outcome.TEMPORARY)
                continue
            entry = self._inspect_safely(name)
            if isinstance(entry, Entry) and self._installer.refused(entry):
                outcomes[name] = self._refused_or_waiting(entry)
            elif isinstance(entry, Entry):
                found.append(entry)
            elif entry is not None:
                outcomes[name] = entry
        young = [e for e in found if e.problem is None and age_s(e.fp) < self.debounce_s]
        if young:
            time.sleep(max(0.0, self.debounce_s - min(age_s(e.fp) for e in young)))
        now = time.monotonic()
        dropped = set()
        for entry in young:
            again = self._inspect_safely(entry.name)
            if isinstance(again, Entry) and again.fp == entry.fp:
                continue
            dropped.add(id(entry))
            if isinstance(again, Entry):  # still being written: the worker takes it from here
                self._events.look_again(entry.name, now)
                outcomes[entry.name] = outcome.being_written(entry.name)
            elif again is not None:
                outcomes[entry.name] = again
        return [e for e in found if id(e) not in dropped]

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
            self._installer.identities.close()
        self._observer = self._worker = None

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued, nothing is pending and the worker is not handling anything."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0 and not self._events and not self._busy and \
                    not self._installer.identities.busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def clear_adapter(self) -> RefitReport | None:
        """Remove the live LoRA adapter: reinstall the pristine base weights (None if no adapter)."""
        with self._lock:
            return self._installer.lineage.clear_adapter()

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
        self._installer.forget(name)

    def _rescan(self) -> None:
        now = time.monotonic()
        for name in self._list_names():
            self._events.look_again(name, now)

    def _list_names(self, *, temp: bool = False) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._folder_str) if temp or not is_temp_name(n))
        except OSError as e:
            log.warning("weights folder %s cannot be listed: %s", self.folder, e)
            return []

    # ------------------------------------------------------------------ inspection
    def _inspect_safely(self, name: str) -> Entry | EntryOutcome | None:
        """The entry ``name`` is now, what became of it when it is not one, or None when it is gone."""
        try:
            found = inspect_entry(self.folder, name, self.policy, self.max_files)
        except Exception as e:
            log.exception("weights watcher: inspecting %s failed", self.folder / name)
            self.metrics.watcher_error()
            return EntryOutcome(name, "failed", "watcher_error", f"inspecting it failed: {type(e).__name__}: {e}")
        if found == "gone":
            self._gone(name)
            return None
        if found == "temp":
            return outcome.ignored(name, outcome.TEMPORARY)
        if found == "ignored":
            self._log_ignored(name)
            return outcome.ignored(name, outcome.NOT_A_CHECKPOINT)
        return found

    def _inspect(self, name: str) -> Entry | None:
        """The entry ``name`` is now; None when it is gone or not a checkpoint (logged once)."""
        found = inspect_entry(self.folder, name, self.policy, self.max_files)
        if found == "gone":
            self._gone(name)
            return None
        if found == "ignored":
            self._log_ignored(name)
        return found if isinstance(found, Entry) else None

    def _log_ignored(self, name: str) -> None:
        if name not in self._ignored_logged:
            self._ignored_logged.add(name)
            log.info("weights folder: ignoring %s (%s)", self.folder / name, outcome.NOT_A_CHECKPOINT)

    def _unchanged(self, entry: Entry) -> bool:
        """Still what was inspected; if not, it is being written: drop it and look again later."""
        again = self._inspect(entry.name)
        if again is not None and again.fp == entry.fp:
            return True
        self._installer.retry(entry.name)
        self._events.look_again(entry.name, time.monotonic())
        return False

    # ------------------------------------------------------------------ processing
    def _process_due(self) -> None:
        now = time.monotonic()
        due = self._events.due(now)
        entries: list[Entry] = []
        for name in due:
            try:
                entry = self._check_due(name, now)
            except Exception:
                log.exception("weights watcher: checking %s failed", self.folder / name)
                self.metrics.watcher_error()
                self._events.forget(name)
                continue
            if entry is not None:
                entries.append(entry)
        if entries:
            self._installer.install(entries, runtime=True)

    def _check_due(self, name: str, now: float) -> Entry | None:
        """Decide on one due entry: drop it, wait for it, reject it, or return it for installing."""
        entry = self._inspect(name)
        if entry is None or self._installer.handled(entry):
            self._events.forget(name)  # gone, or handled already and unchanged since
            return None
        return entry if self._completeness.due(entry, now) else None
