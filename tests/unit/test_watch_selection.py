"""The watcher's choice among complete entries: the newest valid base, then the newest adapter after it."""

from __future__ import annotations

from serving.publish.protocol import publish_key
from serving.watch.selection import Candidate, select_versions


def _c(name: str, t: int, kind: str = "checkpoint") -> Candidate:
    return Candidate(name, kind, publish_key(t, name))


def test_select_newest_base_skipping_rejected_then_newer_adapter() -> None:
    cands = [_c("v1", 1), _c("v2", 2), _c("v3", 3), _c("lora-old", 1, "adapter"), _c("lora-a", 4, "adapter"),
             _c("lora-b", 5, "adapter")]
    results = {"v3": "rejected", "v2": "ok", "lora-b": "rejected", "lora-a": "ok"}
    calls: list[str] = []

    def attempt(c: Candidate) -> str:
        calls.append(c.name)
        return results[c.name]

    sel = select_versions(cands, attempt)
    assert calls == ["v3", "v2", "lora-b", "lora-a"]
    assert sel.base is not None and sel.base.name == "v2"
    assert sel.adapter is not None and sel.adapter.name == "lora-a"
    assert sorted(c.name for c in sel.skipped) == ["lora-old", "v1"]


def test_select_base_published_after_adapters_drops_them() -> None:
    sel = select_versions([_c("lora", 1, "adapter"), _c("v2", 2)], lambda c: "ok")
    assert sel.base is not None and sel.adapter is None
    assert [c.name for c in sel.skipped] == ["lora"]


def test_select_ties_broken_by_name_and_stop_ends_the_batch() -> None:
    calls: list[str] = []

    def attempt(c: Candidate) -> str:
        calls.append(c.name)
        return "stop"

    sel = select_versions([_c("v09", 7), _c("v10", 7), _c("v08", 6)], attempt)
    assert calls == ["v10"] and sel.stopped and sel.base is None


def test_select_adapters_alone_apply_to_the_live_base_and_can_be_disabled() -> None:
    sel = select_versions([_c("a", 1, "adapter"), _c("b", 2, "adapter")], lambda c: "ok")
    assert sel.base is None and sel.adapter is not None and sel.adapter.name == "b"
    off = select_versions([_c("a", 1, "adapter")], lambda c: "ok", adapters_enabled=False)
    assert off.attempted == () and off.skipped == ()
