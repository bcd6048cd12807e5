"""serving.publish.writer: versions published with publish()/publish_tensors() go live through the real
watchdog watcher (outputs change A -> B), a rollback goes live again, an interrupted publish leaves
nothing visible, and the source is never modified."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from watch_helpers import Rig, expected, forward, refits, snapshot, state, wait_for, write_atomic

from serving.cli import main
from serving.errors import PublishError
from serving.examples import TRANSFORMER
from serving.factory import build_module
from serving.hashing import sha256_file
from serving.publish import publish, publish_tensors, staging
from serving.publish.protocol import MANIFEST_NAME, ManifestEntry, entry_name, parse_manifest, render_manifest
from serving.weights.lora import random_adapter, save_adapter

P = "base_model.model."


def started(rigs: list[Rig], folder: Path, **kw: object) -> Rig:
    """A rig serving v1 (seed 1), watching ``folder``."""
    rig = Rig(folder, **kw)  # type: ignore[arg-type]
    rigs.append(rig)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    assert torch.equal(rig.output(), expected(1))
    return rig


def sharded(directory: Path, tensors: Mapping[str, torch.Tensor], shards: int = 3) -> Path:
    """A Hugging Face style sharded checkpoint: shards plus model.safetensors.index.json."""
    directory.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::shards]}
        save_file(part, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def visible(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- names and manifests (pure)


@pytest.mark.parametrize(("version", "source", "is_dir", "name"), [
    (None, "model.safetensors", False, "model.safetensors"),
    ("v3", "model.safetensors", False, "v3.safetensors"),
    ("v3.safetensors", "model.safetensors", False, "v3.safetensors"),
    ("v3", "weights.PT", False, "v3.PT"),
    (None, "release-42", True, "release-42"),
    ("v3", "checkpoint-500", True, "v3"),
])
def test_entry_name(version: str | None, source: str, is_dir: bool, name: str) -> None:
    assert entry_name(version, source, is_dir=is_dir) == name


@pytest.mark.parametrize(("version", "source", "is_dir", "says"), [
    (None, "notes.txt", False, "not a checkpoint file"),
    (".v3", "model.safetensors", False, "hidden or temporary"),
    ("v3.tmp", "ckpt", True, "hidden or temporary"),
    ("a/b", "ckpt", True, "without '/'"),
    ("", "ckpt", True, "non-empty"),
    ("..", "ckpt", True, "non-empty"),
])
def test_entry_name_refuses_names_the_watcher_would_not_see(version: str | None, source: str, is_dir: bool,
                                                              says: str) -> None:
    with pytest.raises(PublishError, match=says):
        entry_name(version, source, is_dir=is_dir)


def test_rendered_manifest_parses_back_to_the_same_manifest() -> None:
    files = [ManifestEntry("b/shard.safetensors", "ab" * 32, 10), ManifestEntry("a.json", "cd" * 32, None)]
    parsed = parse_manifest(render_manifest(files, "v7"), "test")
    assert parsed.version == "v7"
    assert parsed.files == tuple(sorted(files, key=lambda f: f.path))
    assert parse_manifest(render_manifest(files), "test").version is None


# ---------------------------------------------------------------- through the real watcher


def test_published_file_goes_live_and_an_older_version_published_again_is_a_rollback(
        folder: Path, tmp_path: Path, rigs: list[Rig]) -> None:
    rig = started(rigs, folder)
    src = tmp_path / "src"
    src.mkdir()
    save_file(state(2), str(src / "model.safetensors"))
    save_file(state(3), str(src / "other.safetensors"))
    before = snapshot(src)
    assert publish(src / "model.safetensors", folder, version="v2") == folder / "v2.safetensors"
    rig.wait_live("v2")
    assert torch.equal(rig.output(), expected(2))
    publish(src / "other.safetensors", folder, version="v3")
    rig.wait_live("v3")
    assert torch.equal(rig.output(), expected(3))
    # the same name again, older content: replaces the entry and goes live (a rollback)
    done = refits(rig.registry, "success")
    publish(src / "model.safetensors", folder, version="v2")
    wait_for(lambda: refits(rig.registry, "success") == done + 1, "the rollback to v2")
    assert rig.coord.live_version == "v2" and torch.equal(rig.output(), expected(2))
    assert snapshot(src) == before
    assert visible(folder) == ["v1.safetensors", "v2.safetensors", "v3.safetensors"]


def test_published_sharded_directory_goes_live_with_a_manifest(folder: Path, tmp_path: Path,
                                                                rigs: list[Rig]) -> None:
    rig = started(rigs, folder)
    src = sharded(tmp_path / "checkpoint-500", state(2))
    before = snapshot(src)
    dest = publish(src, folder, version="release-2")
    assert dest == folder / "release-2"
    rig.wait_live("release-2")
    assert torch.equal(rig.output(), expected(2))
    manifest = parse_manifest((dest / MANIFEST_NAME).read_bytes(), "test")
    assert manifest.version == "release-2"
    shards = sorted(p.name for p in src.iterdir())
    assert [f.path for f in manifest.files] == shards
    assert all(f.sha256 == sha256_file(src / f.path) and f.size == (src / f.path).stat().st_size
               for f in manifest.files)
    assert snapshot(src) == before


def test_published_directory_replaces_one_of_the_same_name(folder: Path, tmp_path: Path, rigs: list[Rig]) -> None:
    rig = started(rigs, folder)
    publish(sharded(tmp_path / "a", state(2)), folder, version="release")
    rig.wait_live("release")
    done = refits(rig.registry, "success")
    publish(sharded(tmp_path / "b", state(3)), folder, version="release")
    wait_for(lambda: refits(rig.registry, "success") == done + 1, "the second 'release'")
    assert torch.equal(rig.output(), expected(3))
    assert visible(folder) == ["release", "v1.safetensors"]  # nothing left aside


def test_published_peft_adapter_directory_is_merged_into_the_live_base(folder: Path, tmp_path: Path,
                                                                       rigs: list[Rig]) -> None:
    rig = started(rigs, folder)
    module = build_module(TRANSFORMER)
    config, tensors = random_adapter(module, targets=["q_proj", "v_proj"], r=4, alpha=8, seed=5)
    src = save_adapter(tmp_path / "my-lora", config, tensors)
    before = snapshot(src)
    dest = publish(src, folder)
    rig.wait_live("v1+my-lora")
    merged = dict(state(1))
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(P):-len(".lora_A.weight")]
            b = tensors[f"{P}{name}.lora_B.weight"]
            merged[f"{name}.weight"] = merged[f"{name}.weight"] + (8 / 4) * b @ a
    torch.testing.assert_close(rig.output(), forward(merged), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rig.output(), expected(1))
    assert sorted(p.name for p in dest.iterdir()) == ["MANIFEST.json", "adapter_config.json",
                                                       "adapter_model.safetensors"]
    assert snapshot(src) == before


def test_published_state_dict_goes_live(folder: Path, rigs: list[Rig]) -> None:
    rig = started(rigs, folder)
    path = publish_tensors(state(4), folder, version="step-400", metadata={"step": "400"})
    assert path == folder / "step-400.safetensors"
    rig.wait_live("step-400")
    assert torch.equal(rig.output(), expected(4))


# ---------------------------------------------------------------- interrupted publishes


def test_an_interrupted_directory_publish_leaves_nothing_and_serving_goes_on(
        folder: Path, tmp_path: Path, rigs: list[Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    rig = started(rigs, folder)
    src = sharded(tmp_path / "ckpt", state(2))
    before = snapshot(src)
    real = shutil.copyfileobj
    calls = []

    def disk_full_on_the_second_shard(fsrc, fdst, length=0):  # type: ignore[no-untyped-def]
        calls.append(fdst.name)
        if len(calls) == 2:
            fdst.write(fsrc.read(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fsrc, fdst, length)

    monkeypatch.setattr(shutil, "copyfileobj", disk_full_on_the_second_shard)
    size = sum(f.stat().st_size for f in src.iterdir())
    with pytest.raises(PublishError, match=rf"publishing ckpt into {folder}: no space left on the device \(ENOSPC\) "
                                           rf"\(the version has {size} bytes, \d+ bytes are free there now\); nothing "
                                           r"was published and the partial copy was removed. Free space"):
        publish(src, folder, manifest=False)
    assert len(calls) == 2
    assert visible(folder) == ["v1.safetensors"]  # not even a hidden temporary entry
    assert rig.watcher.wait_idle(5)
    assert rig.coord.live_version == "v1" and torch.equal(rig.output(), expected(1))
    assert refits(rig.registry, "rejected") == 0 and not rig.watcher.rejected
    assert snapshot(src) == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_file_publish_leaves_nothing(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    exc: type[BaseException]) -> None:
    src = tmp_path / "model.safetensors"
    save_file(state(2), str(src))
    real = shutil.copyfileobj

    def interrupted(fsrc, fdst, length=0):  # type: ignore[no-untyped-def]
        fdst.write(fsrc.read(1000))
        raise exc()

    monkeypatch.setattr(shutil, "copyfileobj", interrupted)
    with pytest.raises(exc):
        publish(src, folder)
    monkeypatch.setattr(shutil, "copyfileobj", real)
    assert visible(folder) == []


def test_a_staged_entry_is_removed_when_its_writer_fails(folder: Path) -> None:
    with pytest.raises(ValueError), staging(folder, "v9", directory=True) as staged:
        (staged.temp / "model.safetensors").write_bytes(b"half")
        raise ValueError("the writer failed")
    assert visible(folder) == []


# ---------------------------------------------------------------- sources, order, errors


def test_symlinked_source_files_are_copied_and_hidden_ones_left_out(folder: Path, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file(state(2), str(blobs / "abc123"))
    snap = tmp_path / "snapshot"  # a Hugging Face hub snapshot: symlinks into blobs/
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blobs / "abc123")
    (snap / ".cache").write_text("not part of the checkpoint")
    (snap / "model.safetensors.tmp").write_text("a write in progress")
    dest = publish(snap, folder, version="hub")
    assert sorted(p.name for p in dest.iterdir()) == ["MANIFEST.json", "model.safetensors"]
    assert not (dest / "model.safetensors").is_symlink()
    assert (dest / "model.safetensors").read_bytes() == (blobs / "abc123").read_bytes()


def test_a_published_entry_is_the_newest_even_after_an_entry_from_the_future(folder: Path, tmp_path: Path) -> None:
    hour = 3600 * 10**9
    future = write_atomic(folder / "skewed.safetensors", state(1), mtime_ns=os.stat(folder).st_mtime_ns + hour)
    src = tmp_path / "model.safetensors"
    save_file(state(2), str(src))
    os.utime(src, ns=(1, 1))  # an old source: its mtime is not the publish time
    published = publish(src, folder, version="v2")
    assert published.stat().st_mtime_ns > future.stat().st_mtime_ns
    again = publish_tensors(state(3), folder, version="v3")
    assert again.stat().st_mtime_ns > published.stat().st_mtime_ns
    assert src.stat().st_mtime_ns == 1


@pytest.mark.parametrize(("make", "version", "says"), [
    (lambda d: d / "missing.safetensors", None, "cannot publish"),
    (lambda d: (d / "notes.txt", (d / "notes.txt").write_text("x"))[0], None, "not a checkpoint file"),
    (lambda d: (d / "empty", (d / "empty").mkdir(), (d / "empty" / "README").write_text("x"))[0], None,
     "no checkpoint in it"),
    (lambda d: d / "weights" / "v1.safetensors", None, "published entry itself"),
    (lambda d: d / "weights" / "v1.safetensors", ".hidden", "hidden or temporary"),
])
def test_bad_sources_and_names_are_refused_and_nothing_is_published(folder: Path, tmp_path: Path,
                                                                     make: object, version: str | None,
                                                                     says: str) -> None:
    write_atomic(folder / "v1.safetensors", state(1))
    src = make(tmp_path)  # type: ignore[operator]
    listing = visible(folder)
    with pytest.raises(PublishError, match=says):
        publish(src, folder, version=version)
    assert visible(folder) == listing


def test_publishing_into_the_source_directory_itself_is_refused(tmp_path: Path) -> None:
    src = sharded(tmp_path / "ckpt", state(2))
    with pytest.raises(PublishError, match="inside the source"):
        publish(src, src / "weights")
    assert not (src / "weights").exists()


# ---------------------------------------------------------------- hotswap publish


def test_cli_publishes_and_reports_errors(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = sharded(tmp_path / "ckpt", state(2))
    assert main(["publish", str(src), "--to", str(folder), "--version", "v2"]) == 0
    assert "published" in capsys.readouterr().out
    assert (folder / "v2" / MANIFEST_NAME).is_file()
    assert main(["publish", str(tmp_path / "nothing"), "--to", str(folder)]) == 2
    assert "nothing" in capsys.readouterr().err
    assert visible(folder) == ["v2"]
