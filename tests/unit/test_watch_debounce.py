"""The debouncer as a pure function of events: no observer, no threads, no files."""

from __future__ import annotations

from serving.watch.debounce import Debouncer
from serving.watch.observer import FsEvent

F = "/w"


def test_a_rename_into_the_folder_is_due_at_once_a_write_after_the_debounce() -> None:
    d = Debouncer(F, debounce_s=0.5)
    d.absorb(FsEvent("moved", "/w/.v2.tmp", "/w/v2.safetensors", 10.0))
    d.absorb(FsEvent("modified", "/w/v3.safetensors", "", 10.0))
    assert d.due(10.0) == ["v2.safetensors"]
    assert d.due(10.5) == ["v2.safetensors", "v3.safetensors"]
    assert d.next_due(10.0, latest=11.0) == 10.0


def test_writing_after_a_rename_waits_again_and_temp_names_are_not_entries() -> None:
    d = Debouncer(F, debounce_s=0.5)
    d.absorb(FsEvent("moved", "/w/.v2.tmp", "/w/v2", 10.0))
    d.absorb(FsEvent("modified", "/w/v2/model.safetensors", "", 10.2))
    assert d.due(10.2) == [] and d.due(10.7) == ["v2"]
    d.absorb(FsEvent("created", "/w/.v4.safetensors.tmp", "", 11.0))
    d.absorb(FsEvent("modified", "/elsewhere/x", "", 11.0))
    assert set(d.pending) == {"v2"}


def test_deletions_report_gone_names_and_the_folder_itself() -> None:
    d = Debouncer(F, debounce_s=0.5)
    d.absorb(FsEvent("created", "/w/v1.safetensors", "", 1.0))
    assert d.absorb(FsEvent("deleted", "/w/v1.safetensors", "", 2.0)).gone == ("v1.safetensors",)
    assert d.pending == {}
    assert d.absorb(FsEvent("moved", "/w/v5", "/archive/v5", 3.0)).gone == ("v5",)
    assert d.absorb(FsEvent("deleted", "/w", "", 4.0)).folder_deleted
