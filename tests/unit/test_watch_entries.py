"""The weights folder's entries as pure functions of the folder: no watcher, no threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from serving.hashing import sha256_file
from serving.publish.protocol import MANIFEST_NAME
from serving.watch.entries import Entry, check_complete, inspect_entry
from serving.watch.identity import content_hash
from serving.weights import CheckpointPolicy


def policy(folder: Path, **kw: object) -> CheckpointPolicy:
    return CheckpointPolicy(root=folder, **kw)  # type: ignore[arg-type]


def write(folder: Path, name: str, value: float = 1.0) -> Path:
    path = folder / name
    save_file({"w": torch.full((4, 4), value)}, str(path))
    return path


def test_a_safetensors_file_is_a_checkpoint_entry(tmp_path: Path) -> None:
    write(tmp_path, "v1.safetensors")
    entry = inspect_entry(tmp_path, "v1.safetensors", policy(tmp_path), max_files=10)
    assert isinstance(entry, Entry)
    assert (entry.kind, entry.version, entry.is_dir, entry.problem) == ("checkpoint", "v1", False, None)
    assert check_complete(entry, policy(tmp_path)) is None


def test_gone_temp_and_ignored_names(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    write(tmp_path, ".v2.safetensors.tmp")
    p = policy(tmp_path)
    assert inspect_entry(tmp_path, "missing.safetensors", p, 10) == "gone"
    assert inspect_entry(tmp_path, ".v2.safetensors.tmp", p, 10) == "temp"
    assert inspect_entry(tmp_path, "notes.txt", p, 10) == "ignored"


def test_a_truncated_file_is_not_complete(tmp_path: Path) -> None:
    path = write(tmp_path, "v1.safetensors")
    os.truncate(path, path.stat().st_size - 8)
    entry = inspect_entry(tmp_path, "v1.safetensors", policy(tmp_path), 10)
    assert isinstance(entry, Entry)
    problem = check_complete(entry, policy(tmp_path))
    assert problem is not None and problem[0] == "corrupt"


def test_a_symlink_out_of_the_folder_is_refused_without_reading(tmp_path: Path) -> None:
    folder, outside = tmp_path / "weights", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / "v1.safetensors").symlink_to(write(outside, "secret.safetensors"))
    entry = inspect_entry(folder, "v1.safetensors", policy(folder), 10)
    assert isinstance(entry, Entry) and entry.problem is not None and entry.problem[0] == "outside_root"


def test_too_many_files_and_too_large(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    d.mkdir()
    for i in range(5):
        write(d, f"s{i}.safetensors")
    entry = inspect_entry(tmp_path, "v1", policy(tmp_path), max_files=3)
    assert isinstance(entry, Entry) and entry.problem is not None and entry.problem[0] == "too_many_files"
    write(tmp_path, "v2.safetensors")
    big = inspect_entry(tmp_path, "v2.safetensors", policy(tmp_path, max_bytes=10), 10)
    assert isinstance(big, Entry) and big.problem is not None and big.problem[0] == "too_large"


def test_a_verified_manifest_gives_the_version_and_its_identity(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    d.mkdir()
    shard = write(d, "model.safetensors")
    (d / MANIFEST_NAME).write_text(json.dumps({"version": "release-7", "files": [
        {"path": "model.safetensors", "sha256": sha256_file(shard), "size": shard.stat().st_size}]}))
    entry = inspect_entry(tmp_path, "v1", policy(tmp_path), 10)
    assert isinstance(entry, Entry) and entry.version == "release-7"
    assert check_complete(entry, policy(tmp_path)) is None and entry.content_hash is not None
    assert content_hash(entry, lambda size: None) == entry.manifest.content_hash()  # type: ignore[union-attr]


def test_the_refit_log_line_names_the_total_and_every_stage() -> None:
    from serving.refit import RefitReport
    from serving.watch import WatchRecord

    report = RefitReport("success", "v7", "v6", {"read": 0.15, "transfer": 0.05, "swap": 0.00001, "total": 0.2})
    line = WatchRecord("/w/v7.safetensors", "checkpoint", "v7", 10.0, 10.05, 10.45, 0.18, report).summary()
    assert line == ("refit v7 -> success in 450 ms from the first event "
                    "(settle 50, hash 180, read 150, transfer 50, swap 0)")
