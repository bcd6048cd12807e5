"""The watcher's content identities: merged weights, files and directories, quick samples."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from serving.metrics import HotswapMetrics
from serving.watch.entries import Entry, inspect_entry
from serving.watch.identity import Identities, content_hash, content_hash_file, merged_hash, quick_identity
from serving.weights import CheckpointPolicy


def test_merged_hash_depends_on_base_adapter_and_scale() -> None:
    h = merged_hash("b", "a", 1.0)
    assert h is not None and h != merged_hash("b", "a", 0.5) and h != merged_hash("c", "a", 1.0)
    assert merged_hash(None, "a", 1.0) is None


def test_content_hash_of_large_files_is_chunked_in_parallel_and_stable(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(40 << 20) + b"tail")
    with ThreadPoolExecutor(3) as pool:
        parallel = content_hash_file(path, pool)
    assert parallel == content_hash_file(path)
    with open(path, "r+b") as f:
        f.seek(20 << 20)
        f.write(b"X")
    assert content_hash_file(path) != parallel
    assert content_hash_file(tmp_path / "big.bin") != content_hash_file(_empty(tmp_path / "e"))


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _entry(folder: Path, name: str, value: float = 1.0, n: int = 4) -> Entry:
    save_file({"w": torch.full((n, n), value)}, str(folder / name))
    entry = inspect_entry(folder, name, CheckpointPolicy(root=folder), 10)
    assert isinstance(entry, Entry)
    return entry


def test_the_same_bytes_have_one_identity_under_any_name(tmp_path: Path) -> None:
    a, b, c = _entry(tmp_path, "a.safetensors"), _entry(tmp_path, "b.safetensors"), _entry(tmp_path, "c.safetensors", 2)
    assert content_hash_file(a.path) == content_hash_file(b.path) != content_hash_file(c.path)
    assert content_hash(a, lambda size: None) == content_hash_file(a.path)
    assert quick_identity(a) == quick_identity(b) != quick_identity(c)


def test_small_entries_are_hashed_before_they_are_read_large_unseen_ones_after(tmp_path: Path) -> None:
    """Before the read: small checkpoints, and large ones whose quick identity is of known content; after it
    went live: large unseen ones (on a thread of its own), and the hash then makes their quick identity known."""
    hashed_live: list[tuple[str, str]] = []
    ids = Identities(tmp_path, threading.RLock(), HotswapMetrics(), unchanged=lambda e: True,
                     went_live_hashed=lambda v, h: hashed_live.append((v, h)), prehash_max_bytes=1024)
    try:
        small = _entry(tmp_path, "small.safetensors", n=4)
        assert ids.before_read(small, lambda e: set()) is None and small.content_hash == content_hash_file(small.path)
        big = _entry(tmp_path, "big.safetensors", n=64)
        quick = ids.before_read(big, lambda e: set())
        assert quick == quick_identity(big) and big.content_hash is None  # unseen: read first
        ids.after_read(big, went_live=True, quick=quick)
        ids.close()  # waits for the hash of the live weights
        assert hashed_live == [("big", content_hash_file(big.path))] and not ids.busy
        again = _entry(tmp_path, "again.safetensors", n=64)  # the same bytes once more (a rollback)
        assert ids.before_read(again, lambda e: {hashed_live[0][1]}) is not None
        assert again.content_hash == hashed_live[0][1]  # known content: hashed before the read
        other = _entry(tmp_path, "other.safetensors", 2.0, n=64)
        ids.before_read(other, lambda e: {hashed_live[0][1]})
        assert other.content_hash is None
    finally:
        ids.close()


def test_an_entry_changed_while_it_was_hashed_keeps_no_identity(tmp_path: Path) -> None:
    ids = Identities(tmp_path, threading.RLock(), HotswapMetrics(), unchanged=lambda e: False,
                     went_live_hashed=lambda v, h: None, prehash_max_bytes=1024)
    big = _entry(tmp_path, "big.safetensors", n=64)
    quick = ids.before_read(big, lambda e: set())
    ids.after_read(big, went_live=False, quick=quick)  # refused: hashed at once
    assert big.content_hash is None
    ids.close()
