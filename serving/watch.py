"""The weights folder: watch it, decide what is complete and newest, and hand it to the coordinator.

One :class:`WeightsWatcher` per engine. A ``watchdog`` observer (inotify, or polling for NFS and
volumes without inotify) only puts events on a queue; a single worker thread debounces them,
coalesces (of several versions waiting, the newest by publish time is installed and the others are
counted as ``skipped``), checks completeness (the publish protocol of ``docs/publish.md``, decided by
:func:`serving.publish.completeness`), hashes the content, reads and validates the weights, merges
LoRA adapters into the pristine base weights, and calls :meth:`RefitCoordinator.install`.

Nothing here deletes or modifies a file in the folder: files are only stat'ed and read. Every
error inside the worker or the event handler is caught, logged and counted
(``hotswap_watcher_errors_total``); it never stops the watcher. Refused entries are counted as
``hotswap_refits_total{outcome="rejected",reason=...}``, logged once, and recorded in a ledger so
they are not read again until they change.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from serving.errors import ConfigError, HotswapError
from serving.metrics import HotswapMetrics
from serving.publish import (
    ADAPTER_CONFIG,
    MANIFEST_NAME,
    Candidate,
    Fingerprint,
    FoundFile,
    Manifest,
    Observation,
    RejectedLedger,
    Rejection,
    classify_name,
    completeness,
    is_temp_name,
    manifest_problems,
    merged_hash,
    parse_manifest,
    publish_key,
    select_versions,
    tree_hash,
    version_of,
)
from serving.refit import RefitCoordinator, RefitReport, StagedWeights
from serving.weights import CheckpointPolicy, describe_checkpoint, detect_checkpoint, read_header
from serving.weights.lora import adapter_weights_file, merge_lora, read_adapter, read_adapter_config

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver, ObservedWatch

    from serving.settings import ServingSettings

log = logging.getLogger(__name__)

WATCH_MODES = ("inotify", "polling")
#: a version directory with more files than this is refused without reading it
DEFAULT_MAX_FILES = 1000
_HASH_CHUNK = 4 << 20
_CONTENT_CHUNK = 16 << 20
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileAttribEvent, DirAttribEvent,
    FileMovedEvent, DirMovedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent,
]
_STOP = object()
_LOG_CHARS = 800  # longer messages are cut in the log (the ledger keeps them whole)


@dataclass(frozen=True)
class _FsEvent:
    kind: str
    src: str
    dest: str
    when: float


@dataclass
class _Pending:
    """An entry with events the worker has not handled yet."""

    last_event: float
    first_event: float
    renamed_in: bool = False
    closed: bool = False
    recheck_at: float = 0.0
    fp: Fingerprint | None = None
    fp_since: float = 0.0


@dataclass
class _Entry:
    """What the worker found on disk for one top-level name."""

    name: str
    path: Path
    kind: str  # "checkpoint" | "adapter"
    is_dir: bool
    fp: Fingerprint
    mtime_ns: int
    version: str
    manifest: Manifest | None = None
    #: refused without reading (symlink outside the folder, too many files, not a regular file, ...)
    problem: tuple[str, str] | None = None
    #: may only mean "still being copied" (unparseable manifest, a file vanished while listing)
    soft: tuple[str, str] | None = None
    content_hash: str | None = None
    first_event: float | None = None


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


@dataclass
class _Active:
    name: str
    version: str
    content_hash: str | None


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: enqueue, nothing else."""

    def __init__(self, watcher: WeightsWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._queue.put(_FsEvent(event.event_type, os.fsdecode(event.src_path),
                                              os.fsdecode(event.dest_path or b""), time.monotonic()))
        except Exception:
            log.exception("weights watcher: could not enqueue %r", event)
            self._watcher.metrics.watcher_error()


def _sha256_file(path: Path) -> str:
    """Plain sha256 of a file (what a MANIFEST.json lists)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


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
            pos, end = i * _CONTENT_CHUNK, min(size, (i + 1) * _CONTENT_CHUNK)
            while pos < end:
                data = os.pread(fd, min(_HASH_CHUNK, end - pos), pos)
                if not data:
                    raise OSError(f"{path}: shorter than its size while hashing (truncated meanwhile?)")
                h.update(data)
                pos += len(data)
            return h.digest()

        n = max(1, -(-size // _CONTENT_CHUNK))
        digests = list(pool.map(chunk, range(n))) if pool is not None and n > 1 else [chunk(i) for i in range(n)]
    top = hashlib.sha256(f"chunks:{_CONTENT_CHUNK}:{size}\n".encode())
    for d in digests:
        top.update(d)
    return top.hexdigest()


def _row(rel: str, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return (rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)


class WeightsWatcher:
    """Watch ``folder`` and install what is published there into ``coordinator``.

    ``install_initial()`` (synchronous, at startup) then ``start()``; ``stop()`` at shutdown.
    See ``docs/publish.md`` for the rules users follow and this class applies.
    """

    def __init__(self, folder: Path, coordinator: RefitCoordinator, *, mode: str = "inotify",
                 poll_interval_s: float = 1.0, debounce_s: float = 0.2, metrics: HotswapMetrics | None = None,
                 lora_scale: float = 1.0, checkpoint_policy: CheckpointPolicy | None = None,
                 settle_s: float = 2.0, max_files: int = DEFAULT_MAX_FILES) -> None:
        if mode not in WATCH_MODES:
            raise ConfigError(f"watch_mode {mode!r}: choose one of {WATCH_MODES}")
        if poll_interval_s <= 0 or debounce_s < 0 or settle_s < 0 or max_files < 1:
            raise ConfigError(f"invalid watcher timing: poll_interval_s={poll_interval_s}, "
                              f"debounce_s={debounce_s}, settle_s={settle_s}, max_files={max_files}")
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
        self._observer: BaseObserver | None = None
        self._watch: ObservedWatch | None = None
        self._watched_ident: tuple[int, int] | None = None
        self._worker: threading.Thread | None = None
        self._busy = False
        self._missing_logged = False
        self._next_supervise = 0.0
        self._supervise_interval = min(1.0, max(0.05, self.poll_interval_s))

        self._pending: dict[str, _Pending] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._seen: dict[str, Fingerprint] = {}
        self._ignored_logged: set[str] = set()
        self._ledger = RejectedLedger()
        self._base: StagedWeights | None = None
        self._merged: StagedWeights | None = None
        self._pristine: dict[str, torch.Tensor] = {}  # host copies of W0 for adapter-touched weights
        self._adapter: _Active | None = None
        self._base_key: tuple[int, str] | None = None  # publish key of the live base / adapter entry
        self._adapter_key: tuple[int, str] | None = None
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
        return tuple(sorted(list(self._pending)))

    @property
    def base_version(self) -> str | None:
        """The full checkpoint LoRA adapters are merged into."""
        return self._base.version if self._base is not None else None

    @property
    def adapter_version(self) -> str | None:
        """The adapter merged into the live weights, if any."""
        return self._adapter.version if self._adapter is not None else None

    def status(self) -> dict[str, object]:
        """A summary for status pages."""
        return {
            "folder": self._folder_str, "mode": self.mode, "watching": self._watch is not None,
            "live": self.coordinator.live_version, "base": self.base_version,
            "adapter": self.adapter_version, "pending": list(self.pending),
            "rejected": self._ledger.reasons(),
        }

    def install_initial(self) -> RefitReport | None:
        """Install what the folder holds now: the newest valid base checkpoint by publish time (the
        entry's mtime, ties by name), skipping rejected ones, then the newest valid LoRA adapter
        published after that base, merged into it. ``None`` when nothing valid is there.

        Entries that still look like a copy in progress are left to the worker (:meth:`start`).
        """
        with self._lock:
            if not self.folder.is_dir():
                log.warning("weights folder %s does not exist (yet); nothing to install", self.folder)
                return None
            found: list[_Entry] = []
            for name in self._list_names():
                entry = self._inspect_safely(name)
                if entry is not None and self._ledger.lookup(str(entry.path), entry.fp) is None:
                    found.append(entry)
            # entries written less than a debounce interval ago: look again once, they must not change
            young = [e for e in found if e.problem is None and self._age_s(e.fp) < self.debounce_s]
            young_ids = {id(e) for e in young}
            if young:
                time.sleep(max(0.0, self.debounce_s - min(self._age_s(e.fp) for e in young)))
            now = time.monotonic()
            entries: list[_Entry] = []
            for entry in found:
                if id(entry) in young_ids:
                    again = self._inspect_safely(entry.name)
                    if again is None:
                        continue
                    if again.fp != entry.fp:  # still being written: the worker takes it from here
                        self._pending[entry.name] = _Pending(now, now)
                        continue
                obs = Observation(stable=True, age_s=self._age_s(entry.fp),
                                  problem=entry.problem or self._check_complete(entry))
                decision = completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s)
                if decision.action == "wait":
                    self._pending[entry.name] = _Pending(now, now, recheck_at=now + decision.recheck_in_s)
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
        self._observer = self._make_observer()
        self._observer.start()
        with self._lock:
            self._schedule()
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
            try:
                observer.stop()
            except Exception:
                log.exception("weights watcher: stopping the observer failed")
        if worker is not None:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("weights watcher: worker still busy after %.1fs (a refit in progress?)", timeout)
        if observer is not None:
            observer.join(max(0.0, deadline - time.monotonic()))
        if self._pool is not None and (worker is None or not worker.is_alive()):
            self._pool.shutdown(wait=True)
            self._pool = None
        self._observer = self._worker = None
        self._watch = None

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued, nothing is pending and the worker is not handling anything."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0 and not self._pending and not self._busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def clear_adapter(self) -> RefitReport | None:
        """Remove the live LoRA adapter: reinstall the pristine base weights (None if no adapter)."""
        with self._lock:
            if self._adapter is None or self._base is None:
                return None
            report = self.coordinator.install(self._base_weights())
            if report.outcome == "success":
                self._adapter, self._merged, self._adapter_key = None, None, None
            return report

    # ------------------------------------------------------------------ observer
    def _make_observer(self) -> BaseObserver:
        if self.mode == "polling":
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll_interval_s)
        try:
            from watchdog.observers.inotify import InotifyObserver

            # full events: a rename from outside the folder is reported as a move, not a creation
            return InotifyObserver(generate_full_events=True)
        except (ImportError, OSError) as e:  # not Linux, or inotify unavailable: the platform default
            from watchdog.observers import Observer

            log.info("inotify unavailable (%s); using watchdog's default observer", e)
            return Observer()

    def _schedule(self) -> bool:
        assert self._observer is not None
        try:
            st = os.stat(self._folder_str)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(self._folder_str)
            self._watch = self._observer.schedule(_Handler(self), self._folder_str, recursive=True,
                                                  event_filter=_EVENT_FILTER)
        except OSError as e:
            self._watch, self._watched_ident = None, None
            if not self._missing_logged:
                log.warning("weights folder %s cannot be watched (%s); serving continues on %s; "
                            "waiting for the folder to (re)appear", self.folder, e, self.coordinator.live_version)
                self._missing_logged = True
            return False
        self._watched_ident = (st.st_dev, st.st_ino)
        self._missing_logged = False
        return True

    def _emitter_alive(self) -> bool:
        if self._observer is None or self._watch is None:
            return False
        return any(e.watch == self._watch and e.is_alive() for e in self._observer.emitters)

    def _supervise(self, force: bool = False) -> None:
        """Re-establish the watch when the folder was deleted, replaced or appeared."""
        now = time.monotonic()
        if not force and now < self._next_supervise:
            return
        self._next_supervise = now + self._supervise_interval
        if self._observer is None:
            return
        try:
            st = os.stat(self._folder_str)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
        except OSError:
            ident = None
        if ident is not None and ident == self._watched_ident and self._emitter_alive():
            return
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except Exception:  # already gone with its emitter
                log.debug("unschedule failed", exc_info=True)
            self._watch, self._watched_ident = None, None
            if ident is None:
                log.warning("weights folder %s disappeared; serving continues on %s", self.folder,
                            self.coordinator.live_version)
                self._missing_logged = True
        if ident is not None and self._schedule():
            log.info("watching weights folder %s", self.folder)
            self._rescan()

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

    def _due_at(self, p: _Pending) -> float:
        """A rename is a complete publish: considered at once. In-place writes wait for the debounce."""
        return max(p.last_event + (0.0 if p.renamed_in else self.debounce_s), p.recheck_at)

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = now + self._supervise_interval
        for p in self._pending.values():
            due = min(due, self._due_at(p))
        return max(0.001, due - now)

    def _absorb_safely(self, item: object) -> None:
        try:
            if isinstance(item, _FsEvent):
                self._absorb(item)
        except Exception:
            log.exception("weights watcher: could not handle event %r", item)
            self.metrics.watcher_error()

    def _entry_of(self, path: str) -> tuple[str, bool] | None:
        """``(top-level name, whether path is that entry itself)``; None outside the folder or for temp names."""
        if not path:
            return None
        rel = os.path.relpath(os.path.normpath(path), self._folder_str)
        if rel == "." or rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
            return None
        parts = rel.split(os.sep)
        if is_temp_name(parts[0]):
            return None
        return parts[0], len(parts) == 1

    def _absorb(self, ev: _FsEvent) -> None:
        if ev.kind == "deleted" and os.path.normpath(ev.src) == self._folder_str:
            self._supervise(force=True)
            return
        if ev.kind == "moved":
            src, dest = self._entry_of(ev.src), self._entry_of(ev.dest)
            if src is not None and (dest is None or dest[0] != src[0]):
                if src[1]:
                    self._gone(src[0])
                else:
                    self._touch(src[0], ev.when)
            if dest is not None:
                self._touch(dest[0], ev.when, renamed_in=dest[1])
            return
        entry = self._entry_of(ev.src)
        if entry is None:
            return
        name, is_self = entry
        if ev.kind == "deleted" and is_self:
            self._gone(name)
        elif ev.kind == "closed":
            self._touch(name, ev.when, closed=is_self, writing=not is_self)
        elif ev.kind == "modified":
            self._touch(name, ev.when, writing=True)
        elif ev.kind == "created":
            self._touch(name, ev.when, writing=is_self)
        else:  # attrib, deletions below the entry
            self._touch(name, ev.when)

    def _touch(self, name: str, when: float, *, renamed_in: bool = False, closed: bool = False,
               writing: bool = False) -> None:
        p = self._pending.get(name)
        if p is None:
            p = self._pending[name] = _Pending(when, when)
        p.last_event = max(p.last_event, when)
        p.recheck_at = 0.0  # something happened: look again after the debounce, not at a later recheck
        if writing:  # written in place since: neither an atomic rename nor a finished write
            p.renamed_in = p.closed = False
        if renamed_in:
            p.renamed_in, p.closed = True, False
        if closed:
            p.closed = True

    def _gone(self, name: str) -> None:
        self._pending.pop(name, None)
        self._seen.pop(name, None)
        self._ledger.forget(str(self.folder / name))

    def _rescan(self) -> None:
        now = time.monotonic()
        for name in self._list_names():
            self._pending.setdefault(name, _Pending(now, now))

    def _list_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._folder_str) if not is_temp_name(n))
        except OSError as e:
            log.warning("weights folder %s cannot be listed: %s", self.folder, e)
            return []

    # ------------------------------------------------------------------ inspection
    def _age_s(self, fp: Fingerprint) -> float:
        return max(0.0, time.time() - fp.newest_mtime_ns / 1e9)

    def _inspect_safely(self, name: str) -> _Entry | None:
        try:
            return self._inspect(name)
        except Exception:
            log.exception("weights watcher: inspecting %s failed", self.folder / name)
            self.metrics.watcher_error()
            return None

    def _inspect(self, name: str) -> _Entry | None:
        """Stat ``name`` (never reading data): kind, fingerprint, version, problems found on the way."""
        path = self.folder / name
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            self._gone(name)
            return None
        problem: tuple[str, str] | None = None
        target = path
        if stat.S_ISLNK(lst.st_mode):
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as e:
                fp = Fingerprint((_row("", lst),))
                return _Entry(name, path, "checkpoint", False, fp, lst.st_mtime_ns, version_of(name, is_dir=False),
                              soft=("not_found", f"{path}: dangling or looping symlink ({e})"))
            root = self.policy.root.resolve() if self.policy.root is not None else None
            if root is not None and not target.is_relative_to(root):
                fp = Fingerprint((_row("", lst),))
                return _Entry(name, path, "checkpoint", False, fp, lst.st_mtime_ns, version_of(name, is_dir=False),
                              problem=("outside_root", f"{path} -> {target}: the symlink points outside the weights "
                                       f"folder {root}; copy or move the checkpoint into the folder instead"))
        try:
            st = os.stat(target)
        except FileNotFoundError:
            self._gone(name)
            return None
        except OSError as e:
            fp = Fingerprint((_row("", lst),))
            return _Entry(name, path, "checkpoint", False, fp, lst.st_mtime_ns, version_of(name, is_dir=False),
                          problem=("unreadable", f"{path}: cannot stat: {e}"))
        is_dir = stat.S_ISDIR(st.st_mode)
        has_adapter = is_dir and os.path.lexists(path / ADAPTER_CONFIG)
        kind = classify_name(name, is_dir=is_dir, has_adapter_config=has_adapter)
        if kind in ("temp", "ignored"):
            if kind == "ignored" and name not in self._ignored_logged:
                self._ignored_logged.add(name)
                log.info("weights folder: ignoring %s (not a checkpoint: expected a .safetensors file, a "
                         "checkpoint directory or a PEFT adapter directory)", path)
            return None
        if not is_dir:
            fp = Fingerprint((_row("", st),))
            if not stat.S_ISREG(st.st_mode):
                problem = ("unsupported", f"{path}: not a regular file (a fifo, socket or device?); "
                                          f"publish checkpoints as regular files")
            return self._finish_entry(name, path, kind, False, fp, st.st_mtime_ns, None, problem)
        rows, problem = self._walk(path)
        fp = Fingerprint(tuple(rows))
        manifest: Manifest | None = None
        soft: tuple[str, str] | None = None
        if problem is not None and problem[0] == "not_found":
            problem, soft = None, problem
        if problem is None and soft is None and os.path.lexists(path / MANIFEST_NAME):
            try:
                manifest = parse_manifest(self._read_small(path / MANIFEST_NAME), str(path / MANIFEST_NAME))
            except HotswapError as e:
                if e.reason == "outside_root":
                    problem = (e.reason, str(e))
                else:
                    soft = (e.reason, str(e))
        entry = self._finish_entry(name, path, kind, True, fp, st.st_mtime_ns, manifest, problem)
        entry.soft = soft
        return entry

    def _finish_entry(self, name: str, path: Path, kind: str, is_dir: bool, fp: Fingerprint, mtime_ns: int,
                      manifest: Manifest | None, problem: tuple[str, str] | None) -> _Entry:
        if problem is None and fp.total_size > self.policy.max_bytes:
            problem = ("too_large", f"{path}: {fp.total_size} bytes, over the cap of {self.policy.max_bytes} "
                                    f"(max_file_bytes); raise the cap if this is expected")
        version = version_of(name, is_dir=is_dir, manifest_version=manifest.version if manifest else None)
        return _Entry(name, path, kind, is_dir, fp, mtime_ns, version, manifest, problem)

    def _read_small(self, path: Path) -> bytes:
        from serving.errors import CheckpointError, reading

        with reading(path, gone="disappeared while reading", gone_reason="not_found"):
            real = path.resolve(strict=True)
            root = self.policy.root.resolve() if self.policy.root is not None else None
            if root is not None and not real.is_relative_to(root):
                raise CheckpointError(f"{path} -> {real}: outside the weights folder", reason="outside_root")
            if not real.is_file():
                raise CheckpointError(f"{path}: not a regular file", reason="manifest_invalid")
            with open(real, "rb") as f:
                return f.read(2 << 20)

    def _walk(self, top: Path) -> tuple[list[tuple[str, int, int, int, int]], tuple[str, str] | None]:
        """Fingerprint rows of a directory (itself, then every entry below it), capped at max_files."""
        root = self.policy.root.resolve() if self.policy.root is not None else None
        rows = [_row("", os.stat(top))]
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
                if count > self.max_files:
                    return rows, ("too_many_files", f"{top}: more than {self.max_files} files and directories; a "
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
                    rows.append(_row(rel + "/", st))
                    if not child.is_symlink():
                        stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    rows.append(_row(rel, st))
                else:
                    return rows, ("unsupported", f"{top / rel}: not a regular file (a fifo, socket or device?)")
        return rows, None

    def _check_complete(self, entry: _Entry) -> tuple[str, str] | None:
        """The cheap completeness check: headers agree with file sizes, or the manifest verifies."""
        if entry.soft is not None:
            return entry.soft
        try:
            if entry.manifest is not None:
                return self._verify_manifest(entry)
            if entry.kind == "adapter":
                read_adapter_config(entry.path, self.policy)
                weights = adapter_weights_file(entry.path)
                if weights is not None and weights.suffix == ".safetensors":
                    read_header(weights)
                return None
            if entry.is_dir:
                describe_checkpoint(detect_checkpoint(entry.path, self.policy), self.policy)
                return None
            candidate = detect_checkpoint(entry.path, self.policy)  # regular, non-empty, allowed by the policy
            if candidate.format == "safetensors":
                read_header(candidate.files[0])
            return None
        except HotswapError as e:
            return (e.reason, str(e))

    def _verify_manifest(self, entry: _Entry) -> tuple[str, str] | None:
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
                    digest = _sha256_file(entry.path / f.path)
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

    def _hash_pool(self, size: int) -> ThreadPoolExecutor | None:
        """Threads for hashing large files (None for small ones: not worth a thread)."""
        if size <= _CONTENT_CHUNK:
            return None
        if self._pool is None:
            workers = max(1, min(8, (os.cpu_count() or 1)))
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"hotswap-hash-{self.folder.name}")
        return self._pool

    def _content_hash(self, entry: _Entry) -> str:
        if entry.content_hash is not None:
            return entry.content_hash
        if not entry.is_dir:
            return content_hash_file(entry.path, self._hash_pool(entry.fp.total_size))
        files = [(r[0], content_hash_file(entry.path / r[0], self._hash_pool(r[1]))) for r in entry.fp.rows
                 if r[0] and not r[0].endswith("/") and not any(is_temp_name(p) for p in r[0].split("/"))]
        return tree_hash(files)

    # ------------------------------------------------------------------ processing
    def _process_due(self) -> None:
        now = time.monotonic()
        due = sorted(n for n, p in self._pending.items() if now >= self._due_at(p))
        entries: list[_Entry] = []
        for name in due:
            p = self._pending[name]
            try:
                entry = self._gate(name, p, now)
            except Exception:
                log.exception("weights watcher: checking %s failed", self.folder / name)
                self.metrics.watcher_error()
                self._pending.pop(name, None)
                continue
            if entry is not None:
                entries.append(entry)
        if entries:
            self._install_batch(entries, runtime=True)

    def _gate(self, name: str, p: _Pending, now: float) -> _Entry | None:
        """Decide on one due entry: drop it, wait for it, reject it, or return it for installing."""
        entry = self._inspect(name)
        if entry is None:
            self._pending.pop(name, None)
            return None
        if self._seen.get(name) == entry.fp or self._ledger.lookup(str(entry.path), entry.fp) is not None:
            self._pending.pop(name, None)  # handled already, unchanged since
            return None
        if entry.problem is None:
            fast = p.renamed_in or p.closed
            stable = p.fp == entry.fp and now - p.fp_since >= self.debounce_s
            if p.fp != entry.fp:
                p.fp, p.fp_since = entry.fp, now
            if not fast and not stable and self._age_s(entry.fp) < self.settle_s:
                p.recheck_at = now + max(self.debounce_s, 0.01)
                return None
            problem = self._check_complete(entry)
            obs = Observation(renamed_in=p.renamed_in, closed=p.closed, stable=True,
                              age_s=self._age_s(entry.fp), problem=problem)
            decision = completeness(obs, debounce_s=self.debounce_s, settle_s=self.settle_s)
            if decision.action == "wait":
                p.recheck_at = now + decision.recheck_in_s
                return None
            entry.problem = decision.problem
        self._pending.pop(name, None)
        self._seen[name] = entry.fp
        if entry.problem is not None:
            self._reject_entry(entry, *entry.problem)
            return None
        entry.first_event = p.first_event
        return entry

    def _install_batch(self, entries: list[_Entry], *, runtime: bool) -> list[RefitReport]:
        """Install the newest of ``entries`` (see :func:`select_versions`); at runtime, never an entry
        published before the live base (or adapter): the restart rule must pick the same version."""
        reports: list[RefitReport] = []
        adapters_enabled = self.lora_scale != 0.0
        if not adapters_enabled:
            for e in entries:
                if e.kind == "adapter":
                    log.info("weights folder: adapter %s ignored (lora_scale is 0: adapters are off)", e.path)
        if runtime:
            older = [e for e in entries if self._older_than_live(e)]
            if older:
                self.metrics.count_refit("skipped", "older_than_live", len(older))
                log.info("weights folder: not installing %s: published (mtime) before the live %s; to publish an "
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

        candidates = [Candidate(e.name, e.kind, publish_key(e.mtime_ns, e.name)) for e in entries]
        selection = select_versions(candidates, attempt, adapters_enabled=adapters_enabled)
        if runtime and selection.skipped:
            self.metrics.count_refit("skipped", "superseded", len(selection.skipped))
            log.info("weights folder: skipped %d older version(s) published in the same burst: %s",
                     len(selection.skipped), ", ".join(sorted(c.name for c in selection.skipped)[:10]))
        return reports

    def _attempt(self, entry: _Entry) -> tuple[str, RefitReport | None]:
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            entry.content_hash = self._content_hash(entry)
        except FileNotFoundError:
            self._gone(entry.name)
            return "rejected", None
        except OSError as e:
            reason = "unreadable"
            report = self._reject_entry(entry, reason, f"{entry.path}: cannot read: {e}")
            return "rejected", report
        hash_s = time.perf_counter() - t0
        # the entry must still be what was hashed (a write during hashing means: not complete)
        again = self._inspect(entry.name)
        if again is None or again.fp != entry.fp:
            self._seen.pop(entry.name, None)
            now = time.monotonic()
            self._pending.setdefault(entry.name, _Pending(now, now))
            return "rejected", None
        if self._ledger.lookup_hash(str(entry.path), entry.fp, entry.content_hash) is not None:
            log.debug("weights folder: %s has content refused before; not read again", entry.path)
            return "rejected", None
        self._ledger.forget(str(entry.path))  # changed since it was refused: judged afresh
        if entry.kind == "adapter":
            report = self._apply_adapter(entry)
        else:
            report = self._install_checkpoint(entry)
        self.history.append(WatchRecord(str(entry.path), entry.kind, entry.version, entry.first_event, started,
                                        time.monotonic(), hash_s, report))
        if report.outcome in ("success", "noop"):
            return "ok", report
        if report.outcome == "failed":  # the engine's fault, not the file's: retry when it changes
            self._seen.pop(entry.name, None)
            return "stop", report
        self._ledger.record(Rejection(str(entry.path), entry.fp, entry.content_hash, report.reason, report.message))
        return "rejected", report

    def _reject_entry(self, entry: _Entry, reason: str, message: str) -> RefitReport:
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

    def _with_stages(self, report: RefitReport, stages: Mapping[str, float]) -> RefitReport:
        if report.outcome == "success":
            self.metrics.observe_stages({k: v for k, v in stages.items() if k in ("read", "validate")})
        return dataclasses.replace(report, stages={**stages, **report.stages})

    def _install_checkpoint(self, entry: _Entry) -> RefitReport:
        coord = self.coordinator
        h = entry.content_hash
        reuse: StagedWeights | None = None
        if h is not None:
            if coord.live is not None and coord.live.content_hash == h:
                reuse = coord.live  # the coordinator reports a no-op
            elif coord.previous is not None and coord.previous.content_hash == h:
                reuse = coord.previous  # a rollback published as a file: no read, no transfer
            elif self._base is not None and self._base.content_hash == h:
                reuse = self._base_weights()  # the base again while an adapter is live: back to W0
        if reuse is not None:
            staged = StagedWeights(entry.version, reuse.tensors, str(entry.path), h, file_exact=reuse.file_exact)
            report = coord.install(staged)
        else:
            # the coordinator's own read: on CUDA it streams straight into the standby slot's tensors
            report = coord.refit_from_path(entry.path, version=entry.version, content_hash=h)
        if report.outcome in ("success", "noop"):
            self._base_key = publish_key(entry.mtime_ns, entry.name)
            self._adapter_key = None
        if report.outcome == "success":
            self._base, self._pristine, self._merged, self._adapter = coord.live, {}, None, None
        elif report.outcome == "noop" and self._adapter is None and coord.live is not None:
            self._base = coord.live
        return report

    def _older_than_live(self, e: _Entry) -> bool:
        key = publish_key(e.mtime_ns, e.name)
        if self._base_key is not None and key <= self._base_key:
            return True
        return e.kind == "adapter" and self._adapter_key is not None and key <= self._adapter_key

    def _current_base(self) -> StagedWeights | None:
        if self._base is not None:
            return self._base
        live = self.coordinator.live
        return live if live is not None and live is not self._merged else None

    def _base_weights(self) -> StagedWeights:
        """The pristine base: its own tensors, with the host copies of every weight an adapter touched.

        The coordinator may reuse the buffers of weights that no longer serve (the fast path writes
        the next checkpoint into them), so W0 of adapter-touched weights is kept as host copies,
        taken while those weights were still live and intact.
        """
        base = self._base
        assert base is not None
        return dataclasses.replace(base, tensors={**base.tensors, **self._pristine})

    def _apply_adapter(self, entry: _Entry) -> RefitReport:
        coord = self.coordinator
        base = self._current_base()
        if base is None:
            return self._rejected(entry.version, "no_base",
                                  f"{entry.path}: a LoRA adapter needs base weights to merge into and none are "
                                  f"live; publish a base checkpoint, then publish the adapter again (or touch it)")
        if self._base is None:
            self._base, self._pristine = base, {}
        version = f"{base.version}+{entry.version}"
        mh = merged_hash(base.content_hash, entry.content_hash, self.lora_scale)
        live = coord.live
        if mh is not None and live is not None and live.content_hash == mh:
            report = coord.install(StagedWeights(version, live.tensors, str(entry.path), mh))  # a no-op
            self._adapter_key = publish_key(entry.mtime_ns, entry.name)
            return report
        t0 = time.perf_counter()
        try:
            adapter = read_adapter(entry.path, coord.engine.weight_specs(), self.policy, name=entry.version)
            t1 = time.perf_counter()
            for name in adapter.touched - set(self._pristine):
                # untouched so far, so live since the base was installed: intact
                self._pristine[name] = base.tensors[name].detach().to("cpu", copy=True)
            merged = merge_lora(self._base_weights().tensors, adapter, scale=self.lora_scale,
                                device=coord.engine.device)
        except HotswapError as e:
            return self._rejected(entry.version, e.reason, str(e))
        t2 = time.perf_counter()
        staged = StagedWeights(version, merged, str(entry.path), mh)
        report = self._with_stages(coord.install(staged), {"read": t1 - t0, "merge": t2 - t1})
        if report.outcome in ("success", "noop"):
            self._adapter_key = publish_key(entry.mtime_ns, entry.name)
        if report.outcome == "success":
            self._merged = staged
            self._adapter = _Active(entry.name, entry.version, entry.content_hash)
        return report
