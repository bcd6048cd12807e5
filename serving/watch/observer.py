"""Filesystem events in, nothing else: a watchdog observer on the weights folder.

:class:`FolderObserver` schedules a recursive watch (inotify, or polling for NFS and volumes
without inotify), hands every event to a callback as an :class:`FsEvent` (the callback only
enqueues), and re-establishes the watch when the folder is deleted, replaced or appears later.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watchdog import events as watchdog_events
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger("serving.watch")

#: attribute changes (chmod) are events of their own from watchdog 7 on; before it (6.0 is the newest on Python
#: 3.10) inotify reports them as modifications, which the filter takes anyway
ATTRIB_EVENTS: list[type[FileSystemEvent]] = [
    getattr(watchdog_events, name) for name in ("FileAttribEvent", "DirAttribEvent") if hasattr(watchdog_events, name)]

EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, *ATTRIB_EVENTS,
    FileMovedEvent, DirMovedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent,
]


def event_kind(event: FileSystemEvent) -> str:
    """The kind the debouncer reads: watchdog's event type, with a directory's modification read as an
    attribute change. ``touch adapter/`` (publishing a folder again) arrives only as a DirModifiedEvent from
    the polling observer and from watchdog 6's inotify one; the same event also reports a child created or
    deleted, which has events of its own, so it only refreshes the entry's time. Pure."""
    if isinstance(event, DirModifiedEvent):
        return "attrib"
    return event.event_type


@dataclass(frozen=True)
class FsEvent:
    """One filesystem event, as the worker sees it (``time.monotonic()`` clock)."""

    kind: str
    src: str
    dest: str
    when: float


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: hand the event on, nothing else."""

    def __init__(self, on_event: Callable[[FsEvent], None], on_error: Callable[[], None]) -> None:
        self._on_event = on_event
        self._on_error = on_error

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._on_event(FsEvent(event_kind(event), os.fsdecode(event.src_path),
                                   os.fsdecode(event.dest_path or b""), time.monotonic()))
        except Exception:
            log.exception("weights watcher: could not enqueue %r", event)
            self._on_error()


def make_observer(mode: str, poll_interval_s: float) -> BaseObserver:
    """A watchdog observer for ``mode`` (inotify falls back to the platform default where missing)."""
    if mode == "polling":
        from watchdog.observers.polling import PollingObserver

        return PollingObserver(timeout=poll_interval_s)
    try:
        from watchdog.observers.inotify import InotifyObserver

        # full events: a rename from outside the folder is reported as a move, not a creation
        return InotifyObserver(generate_full_events=True)
    except (ImportError, OSError) as e:  # not Linux, or inotify unavailable
        from watchdog.observers import Observer

        log.info("inotify unavailable (%s); using watchdog's default observer", e)
        return Observer()


class FolderObserver:
    """The observer thread and the watch on one folder, kept alive across the folder's deletion."""

    def __init__(self, folder: str, mode: str, poll_interval_s: float, on_event: Callable[[FsEvent], None],
                 on_error: Callable[[], None], describe_live: Callable[[], object]) -> None:
        self.folder = folder
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self._handler = _Handler(on_event, on_error)
        self._describe_live = describe_live  # for log lines: what keeps serving meanwhile
        self._observer: BaseObserver | None = None
        self._watch: ObservedWatch | None = None
        self._ident: tuple[int, int] | None = None
        self._missing_logged = False
        self._next_check = 0.0
        self.check_interval_s = min(1.0, max(0.05, poll_interval_s))

    @property
    def watching(self) -> bool:
        return self._watch is not None

    def start(self) -> None:
        self._observer = make_observer(self.mode, self.poll_interval_s)
        self._observer.start()
        self.schedule()

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
            except Exception:
                log.exception("weights watcher: stopping the observer failed")

    def join(self, timeout: float) -> None:
        if self._observer is not None:
            self._observer.join(timeout)
        self._observer, self._watch = None, None

    def schedule(self) -> bool:
        """Watch the folder; False (logged once) when it cannot be watched now."""
        assert self._observer is not None
        try:
            st = os.stat(self.folder)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(self.folder)
            self._watch = self._observer.schedule(self._handler, self.folder, recursive=True,
                                                  event_filter=EVENT_FILTER)
        except OSError as e:
            self._watch, self._ident = None, None
            if not self._missing_logged:
                log.warning("weights folder %s cannot be watched (%s); serving continues on %s; "
                            "waiting for the folder to (re)appear", self.folder, e, self._describe_live())
                self._missing_logged = True
            return False
        self._ident = (st.st_dev, st.st_ino)
        self._missing_logged = False
        return True

    def _emitter_alive(self) -> bool:
        if self._observer is None or self._watch is None:
            return False
        return any(e.watch == self._watch and e.is_alive() for e in self._observer.emitters)

    def supervise(self, force: bool = False) -> bool:
        """Re-establish the watch when the folder was deleted, replaced or appeared (checked at most
        every ``check_interval_s`` unless forced). True when a new watch started: the caller rescans."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self.check_interval_s
        if self._observer is None:
            return False
        try:
            st = os.stat(self.folder)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
        except OSError:
            ident = None
        if ident is not None and ident == self._ident and self._emitter_alive():
            return False
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except Exception:  # already gone with its emitter
                log.debug("unschedule failed", exc_info=True)
            self._watch, self._ident = None, None
            if ident is None:
                log.warning("weights folder %s disappeared; serving continues on %s", self.folder,
                            self._describe_live())
                self._missing_logged = True
        if ident is not None and self.schedule():
            log.info("watching weights folder %s", self.folder)
            return True
        return False
