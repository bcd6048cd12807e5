"""The debouncer as a pure function of events: no observer, no threads, no files."""

from __future__ import annotations

from serving.watch.debounce import Debouncer
from serving.watch.ledger import Fingerprint
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
    assert d.names == ("v2",)


def test_deletions_report_gone_names_and_the_folder_itself() -> None:
    d = Debouncer(F, debounce_s=0.5)
    d.absorb(FsEvent("created", "/w/v1.safetensors", "", 1.0))
    assert d.absorb(FsEvent("deleted", "/w/v1.safetensors", "", 2.0)).gone == ("v1.safetensors",)
    assert d.names == () and len(d) == 0
    assert d.absorb(FsEvent("moved", "/w/v5", "/archive/v5", 3.0)).gone == ("v5",)
    assert d.absorb(FsEvent("deleted", "/w", "", 4.0)).folder_deleted


def test_the_watcher_s_decisions_go_through_the_debouncer_s_methods() -> None:
    d = Debouncer(F, debounce_s=0.5)
    d.look_again("v1", 5.0)  # found by a scan
    assert d.due(5.5) == ["v1"]
    d.recheck("v1", at=7.0)  # due, but not complete yet
    assert d.due(6.9) == [] and d.next_due(6.0, latest=9.0) == 7.0
    fp, fp2 = Fingerprint((("", 1, 1, 1, 1),)), Fingerprint((("", 2, 2, 1, 1),))
    assert not d.settled("v1", fp, 7.0)  # first seen
    assert not d.settled("v1", fp, 7.2) and d.settled("v1", fp, 7.5)  # unchanged for a debounce interval
    assert not d.settled("v1", fp2, 8.0) and not d.settled("v1", fp2, 8.4)  # changed: the wait starts again
    d.look_again("v1", 9.0, at=12.0)  # kept as it is (first event 5.0), looked at no sooner than 12.0
    p = d.get("v1")
    assert p is not None and p.first_event == 5.0 and p.recheck_at == 12.0
    assert d.forget("v1") is p and d.get("v1") is None and d.forget("v1") is None
