"""serving/watch/observer.py: what reaches the debouncer, with either observer and on every watchdog the project
accepts (7 on Python 3.11+, 6.0 on Python 3.10, which has no attribute events)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from watchdog.events import DirModifiedEvent, FileModifiedEvent

from serving.watch.observer import EVENT_FILTER, FolderObserver, FsEvent, event_kind


def test_a_directory_s_modification_is_an_attribute_change_and_a_file_s_a_write() -> None:
    assert DirModifiedEvent in EVENT_FILTER
    assert event_kind(DirModifiedEvent("/w/adapter")) == "attrib"
    assert event_kind(FileModifiedEvent("/w/v1.safetensors")) == "modified"


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_touching_an_adapter_folder_reaches_the_debouncer_as_an_attribute_change(tmp_path: Path, mode: str) -> None:
    """``touch adapter/`` publishes an adapter again (docs): its event must come through on this watchdog."""
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    seen: list[FsEvent] = []
    touched = threading.Event()

    def on_event(ev: FsEvent) -> None:
        seen.append(ev)
        if ev.kind == "attrib" and ev.src == str(adapter):
            touched.set()

    obs = FolderObserver(str(tmp_path), mode, 0.05, on_event, lambda: None, lambda: "v0")
    obs.start()
    try:
        time.sleep(0.3)  # the polling observer's first snapshot
        later = time.time() + 60
        os.utime(adapter, (later, later))
        assert touched.wait(10), f"no attribute event for {adapter}: {seen}"
    finally:
        obs.stop()
        obs.join(5)
