"""The watcher's content identities: merged weights, files and directories, quick samples."""

from __future__ import annotations

from serving.watch.identity import merged_hash


def test_merged_hash_depends_on_base_adapter_and_scale() -> None:
    h = merged_hash("b", "a", 1.0)
    assert h is not None and h != merged_hash("b", "a", 0.5) and h != merged_hash("c", "a", 1.0)
    assert merged_hash(None, "a", 1.0) is None
