"""The weights-folder watcher with the real watchdog on real files: the publish protocol end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from watch_helpers import (
    DEBOUNCE,
    Rig,
    expected,
    refits,
    safetensors_bytes,
    state,
    wait_for,
    watcher_errors,
    write_atomic,
)

from serving.refit import RefitReport
from serving.watch import WeightsWatcher, content_hash_file

MODES = ["inotify", "polling"]


def make(rigs: list[Rig], folder: Path, **kw: object) -> Rig:
    rig = Rig(folder, **kw)  # type: ignore[arg-type]
    rigs.append(rig)
    return rig


def assert_serves(rig: Rig, seed: int) -> None:
    torch.testing.assert_close(rig.output(), expected(seed), rtol=0, atol=0)


# ---------------------------------------------------------------- startup


def test_install_initial_picks_the_newest_arrival_skipping_rejected(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder)
    hour = 3600 * 10**9
    now = time.time_ns()
    # an old mtime does not make a version old: what counts is when it arrived (cp -a, rsync -a keep mtimes)
    write_atomic(folder / "z-old.safetensors", state(9), mtime_ns=now + hour)
    write_atomic(folder / "v1.safetensors", state(1), mtime_ns=now - 4 * hour)
    write_atomic(folder / "v2.safetensors", state(2), mtime_ns=now - 5 * hour)
    bad = write_atomic(folder / "v3.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
                       mtime_ns=now - 2 * hour)
    (folder / "README.md").write_text("not a checkpoint: ignored, not rejected")
    report = rig.watcher.install_initial().report
    assert report is not None and report.outcome == "success" and report.version == "v2"
    assert_serves(rig, 2)
    assert dict(rig.watcher.rejected) == {str(bad): "corrupt"}
    assert refits(rig.registry, "rejected", "corrupt") == 1
    assert refits(rig.registry, "skipped") == 0  # startup does not count history as skipped


def test_install_initial_ties_by_name_and_none_when_nothing_valid(tmp_path: Path, rigs: list[Rig]) -> None:
    missing = make(rigs, tmp_path / "nope")
    assert missing.watcher.install_initial().report is None
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    rig = make(rigs, empty_dir)
    assert rig.watcher.install_initial().report is None
    t = rig.clock.next()
    write_atomic(empty_dir / "a.safetensors", state(1), mtime_ns=t)
    write_atomic(empty_dir / "b.safetensors", state(2), mtime_ns=t)
    rig2 = make(rigs, empty_dir)
    report = rig2.watcher.install_initial().report
    assert report is not None and report.version == "b"


# ---------------------------------------------------------------- publishing at runtime


@pytest.mark.parametrize("mode", MODES)
def test_rename_publishes_and_temp_names_are_ignored(folder: Path, rigs: list[Rig], mode: str) -> None:
    rig = make(rigs, folder, mode=mode)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    (folder / "v2.safetensors.tmp").write_bytes(safetensors_bytes(state(2)))
    (folder / ".hidden.safetensors").write_bytes(b"junk")
    rig.idle()
    assert rig.coord.live_version == "v1" and not rig.watcher.rejected
    os.rename(folder / "v2.safetensors.tmp", folder / "v2.safetensors")
    rig.wait_live("v2")
    assert_serves(rig, 2)
    rig.idle()
    assert refits(rig.registry, "success") == 2 and not rig.watcher.rejected


@pytest.mark.parametrize("mode", MODES)
def test_plain_copy_is_considered_only_once_complete(folder: Path, rigs: list[Rig], mode: str) -> None:
    """A writer that pauses mid-file (longer than the debounce): the truncated state is never read as a version."""
    rig = make(rigs, folder, mode=mode, settle_s=5.0)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    data = safetensors_bytes(state(2))
    path = folder / "v2.safetensors"
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        # while half-written and quiet, the watcher looks at it (more than once) and must wait
        wait_for(lambda: "v2.safetensors" in rig.watcher.pending, "the half file is seen")
        paused = time.monotonic()
        wait_for(lambda: time.monotonic() - paused > 6 * DEBOUNCE, "a pause longer than the debounce")
        assert rig.coord.live_version == "v1" and not rig.watcher.rejected
        f.write(data[len(data) // 2:])
    rig.wait_live("v2")
    assert_serves(rig, 2)
    rig.idle()
    assert not rig.watcher.rejected and refits(rig.registry, "rejected") == 0


def test_same_content_is_noop_and_republishing_an_earlier_version_installs_it(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder)
    v1 = rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    # the same bytes as the live version, under another name: nothing to do
    rig.publish("v2-copy.safetensors", 2)
    wait_for(lambda: refits(rig.registry, "noop") == 1, "a no-op")
    assert rig.coord.live_version == "v2"
    # an earlier version published again (a fresh copy: new publish time) is a rollback
    shutil.copyfile(v1, folder / ".rollback.tmp")
    os.rename(folder / ".rollback.tmp", folder / "rollback.safetensors")
    rig.wait_live("rollback")
    assert_serves(rig, 1)
    assert rig.coord.live is not None and rig.coord.live.content_hash == content_hash_file(v1)


def test_moving_in_an_archived_file_publishes_it_whatever_its_mtime(folder: Path, rigs: list[Rig],
                                                                      tmp_path: Path) -> None:
    rig = make(rigs, folder)
    rig.publish("v2.safetensors", 2)
    rig.watcher.install_initial()
    rig.start()
    archive = tmp_path / "archive"
    archive.mkdir()
    old = write_atomic(archive / "v1.safetensors", state(1), mtime_ns=rig.clock.last - 10**12)
    os.rename(old, folder / "v1.safetensors")  # `mv` of an archived file: arrives now, a rollback
    rig.wait_live("v1")
    assert_serves(rig, 1)
    assert refits(rig.registry, "skipped", "older_than_live") == 0


COPY_TOOLS = {
    "cp -a": lambda src, dst: subprocess.run(["cp", "-a", str(src), str(dst)], check=True),
    "rsync -a": lambda src, dst: subprocess.run(["rsync", "-a", str(src), str(dst)], check=True),
    "tar -x": lambda src, dst: subprocess.run(f"tar -C {shlex.quote(str(src.parent))} -cf - {shlex.quote(src.name)}"
                                              f" | tar -C {shlex.quote(str(dst.parent))} -xf -", shell=True,
                                              check=True),
    "shutil.copy2": lambda src, dst: shutil.copy2(src, dst),
    "shutil.copytree": lambda src, dst: shutil.copytree(src, dst),
}


#: the programs a copy tool runs (the shutil ones run none): a missing one skips that case only
PROGRAMS = {"cp -a": ("cp",), "rsync -a": ("rsync",), "tar -x": ("tar",)}


@pytest.mark.parametrize("tool", [pytest.param(t, marks=pytest.mark.requires_tool(*PROGRAMS.get(t, ())))
                                  for t in sorted(COPY_TOOLS)])
def test_copy_tools_that_keep_mtimes_publish_and_an_old_version_copied_in_is_a_rollback(
        tool: str, folder: Path, rigs: list[Rig], tmp_path: Path) -> None:
    """Tools that keep the source's (old) modification time still publish: publish time is arrival."""
    program = tool.split()[0]
    if "." not in program and shutil.which(program) is None:
        pytest.skip(f"{program} is not installed here (CI installs it)")
    rig = make(rigs, folder, settle_s=0.3)
    rig.publish("v2.safetensors", 2)
    rig.watcher.install_initial()
    rig.start()
    archive = tmp_path / "archive"
    archive.mkdir()
    long_ago = rig.clock.last - 30 * 24 * 3600 * 10**9
    if tool == "shutil.copytree":  # a save_pretrained-style directory
        src = archive / "v1"
        src.mkdir()
        write_atomic(src / "model.safetensors", state(1), mtime_ns=long_ago)
        (src / "config.json").write_text("{}")
        os.utime(src, ns=(long_ago, long_ago))
    else:
        src = write_atomic(archive / "v1.safetensors", state(1), mtime_ns=long_ago)
    COPY_TOOLS[tool](src, folder / src.name)
    assert (folder / src.name).stat().st_mtime_ns // 10**9 == long_ago // 10**9  # the tool kept the old mtime
    rig.wait_live("v1")
    assert_serves(rig, 1)


def test_unchanged_entries_are_not_handled_twice(folder: Path, rigs: list[Rig]) -> None:
    """Events that do not change an entry (an open for writing, closed untouched) do not reinstall it."""
    rig = make(rigs, folder)
    v1 = rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    open(v1, "r+b").close()  # IN_CLOSE_WRITE on v1 without a change
    rig.publish("v3.safetensors", 3)
    rig.wait_live("v3")
    rig.idle()
    assert [r.version for r in rig.watcher.history] == ["v1", "v2", "v3"]


def _sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("mode", MODES)
def test_sharded_directory_renamed_in(folder: Path, rigs: list[Rig], mode: str) -> None:
    rig = make(rigs, folder, mode=mode)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    _sharded(folder / ".v2.tmp", state(2))
    os.rename(folder / ".v2.tmp", folder / "v2")
    rig.wait_live("v2")
    assert_serves(rig, 2)
    rig.idle()
    assert not rig.watcher.rejected


def _manifest(files: dict[str, bytes], version: str | None = None) -> bytes:
    doc: dict[str, object] = {"files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}}
    if version:
        doc["version"] = version
    return json.dumps(doc).encode()


def test_directory_built_in_place_counts_only_when_its_manifest_verifies(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder, settle_s=30.0)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    data = safetensors_bytes(state(2))
    d = folder / "v2"
    d.mkdir()
    (d / "MANIFEST.json").write_bytes(_manifest({"model.safetensors": data}, version="release-7"))
    with open(d / "model.safetensors", "wb") as f:
        f.write(data[:1000])
        f.flush()
        wait_for(lambda: "v2" in rig.watcher.pending, "the directory is seen")
        paused = time.monotonic()
        wait_for(lambda: time.monotonic() - paused > 6 * DEBOUNCE, "a pause")
        assert rig.coord.live_version == "v1" and not rig.watcher.rejected
        f.write(data[1000:])
    rig.wait_live("release-7")  # the manifest's version names it
    assert_serves(rig, 2)
    live = rig.coord.live
    assert live is not None and live.content_hash is not None


def test_manifest_that_never_matches_is_rejected_once_settled(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder, settle_s=0.3)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    tmp = folder / ".v2.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(safetensors_bytes(state(2)))
    (tmp / "MANIFEST.json").write_bytes(_manifest({"model.safetensors": b"other bytes"}))
    d = folder / "v2"
    os.rename(tmp, d)
    assert rig.wait_rejected(d) == "manifest_mismatch"
    rej = rig.watcher.rejection(d)
    assert rej is not None and "model.safetensors: sha256" in rej.message
    assert_serves(rig, 1)


# ---------------------------------------------------------------- bursts and coalescing


def test_burst_of_100_versions_while_serving(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder)
    rig.publish("v000.safetensors", 0)
    rig.watcher.install_initial()
    rig.start()
    outputs = {i: expected(i) for i in range(101)}
    stop = threading.Event()
    problems: list[str] = []
    served = [0]

    def client() -> None:
        while not stop.is_set():
            try:
                out = rig.output()
            except Exception as e:  # pragma: no cover - the failure being tested for
                problems.append(f"inference raised {e!r}")
                return
            if not any(torch.equal(out, ref) for ref in outputs.values()):
                problems.append("an output matching no published version (mixed weights)")
                return
            served[0] += 1

    t = threading.Thread(target=client, name="burst-client")
    t.start()
    try:
        for i in range(1, 101):
            rig.publish(f"v{i:03d}.safetensors", i)
        rig.wait_live("v100", timeout=60)
        rig.idle(60)
    finally:
        stop.set()
        t.join(10)
    assert not problems, problems
    assert served[0] > 0
    assert_serves(rig, 100)
    assert refits(rig.registry, "rejected") == 0 and refits(rig.registry, "failed") == 0
    # each of the 100 was either installed or skipped, exactly once
    installed = refits(rig.registry, "success") - 1  # minus the initial v000
    assert installed + refits(rig.registry, "skipped") == 100
    assert watcher_errors(rig.registry) == 0


def test_versions_arriving_during_a_refit_are_coalesced(folder: Path, rigs: list[Rig],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make(rigs, folder)
    rig.publish("v01.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    release = threading.Event()
    entered = threading.Event()
    real = rig.coord.refit_from_path

    def slow(path: Path, **kw: object) -> RefitReport:
        if Path(path).name == "v02.safetensors":
            entered.set()
            assert release.wait(30)
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.coord, "refit_from_path", slow)
    rig.publish("v02.safetensors", 2)
    wait_for(entered.is_set, "the refit of v02 is running")
    for i in range(3, 13):
        rig.publish(f"v{i:02d}.safetensors", i)
    published = time.monotonic()

    def queued() -> set[str]:
        return {os.path.basename(getattr(ev, "dest", "") or getattr(ev, "src", ""))
                for ev in list(rig.watcher._queue.queue)}

    wait_for(lambda: {f"v{i:02d}.safetensors" for i in range(3, 13)} <= queued(), "all ten events queued")
    wait_for(lambda: time.monotonic() - published > 3 * DEBOUNCE, "the burst is quiet for a debounce")
    release.set()
    rig.wait_live("v12")
    rig.idle()
    assert refits(rig.registry, "skipped", "superseded") == 9
    assert [r.version for r in rig.watcher.history] == ["v01", "v02", "v12"]
    assert_serves(rig, 12)


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("mode", MODES)
def test_folder_deleted_and_recreated_keeps_working(folder: Path, rigs: list[Rig], mode: str) -> None:
    rig = make(rigs, folder, mode=mode)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    shutil.rmtree(folder)
    wait_for(lambda: not rig.watcher.status()["watching"], "the watcher notices the folder is gone")
    assert_serves(rig, 1)  # serving does not care
    folder.mkdir()
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    rig.publish("v3.safetensors", 3)  # and events flow again
    rig.wait_live("v3")
    assert_serves(rig, 3)
    assert watcher_errors(rig.registry) == 0


def test_watcher_started_before_the_folder_exists(tmp_path: Path, rigs: list[Rig]) -> None:
    folder = tmp_path / "later"
    rig = make(rigs, folder)
    assert rig.watcher.install_initial().report is None
    rig.start()
    folder.mkdir()
    rig.publish("v1.safetensors", 1)
    rig.wait_live("v1")


def test_errors_in_the_worker_are_counted_and_do_not_stop_it(folder: Path, rigs: list[Rig],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make(rigs, folder)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    real_inspect = rig.watcher._inspect
    real_refit = rig.coord.refit_from_path

    def bad_inspect(name: str) -> object:
        if name == "boom.safetensors":
            raise RuntimeError("inspect failed")
        return real_inspect(name)

    def bad_refit(path: Path, **kw: object) -> RefitReport:
        if Path(path).name == "v2.safetensors":
            raise RuntimeError("refit exploded")
        return real_refit(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.watcher, "_inspect", bad_inspect)
    monkeypatch.setattr(rig.coord, "refit_from_path", bad_refit)
    rig.publish("boom.safetensors", 5)
    wait_for(lambda: watcher_errors(rig.registry) >= 1, "the inspect error is counted")
    rig.publish("v2.safetensors", 2)
    wait_for(lambda: watcher_errors(rig.registry) >= 2, "the refit error is counted")
    assert rig.coord.live_version == "v1"
    rig.publish("v3.safetensors", 3)
    rig.wait_live("v3")
    assert_serves(rig, 3)


def test_an_error_escaping_a_batch_is_logged_counted_and_the_next_publish_goes_live(
        folder: Path, rigs: list[Rig], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The worker's last line of defence: an error out of a whole batch (not one entry's attempt)."""
    rig = make(rigs, folder)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    installer = rig.watcher._installer
    real_install = installer.install
    raised: list[str] = []

    def install_failing_once(entries: list[Any], *, runtime: bool) -> object:
        if not raised:
            raised.append(entries[0].name)
            raise RuntimeError("injected: the batch failed")
        return real_install(entries, runtime=runtime)

    monkeypatch.setattr(installer, "install", install_failing_once)
    rig.publish("boom.safetensors", 5)
    wait_for(lambda: watcher_errors(rig.registry) == 1, "the error is counted")
    assert raised == ["boom.safetensors"] and rig.coord.live_version == "v1"
    assert_serves(rig, 1)
    assert any("unexpected error; the watcher keeps running" in r.getMessage() and r.exc_info
               for r in caplog.records)
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    assert_serves(rig, 2)


def test_deleting_files_never_changes_what_is_served(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder)
    v1 = rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    v1.unlink()
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    (folder / "v2.safetensors").unlink()
    rig.idle()
    assert rig.coord.live_version == "v2"
    assert_serves(rig, 2)


def test_stop_is_prompt_and_restartable(folder: Path, rigs: list[Rig]) -> None:
    rig = make(rigs, folder)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    t0 = time.monotonic()
    rig.watcher.stop(timeout=5)
    assert time.monotonic() - t0 < 5
    rig.publish("v2.safetensors", 2)  # published while stopped: picked up by the next start
    rig.watcher.start()
    rig.wait_live("v2")


def test_settings_build_a_watcher(tmp_path: Path, rigs: list[Rig]) -> None:
    from serving.settings import parse_settings

    settings = parse_settings({"model_factory": "serving.examples.transformer:tiny_transformer",
                               "weights_dir": str(tmp_path), "watch_mode": "polling", "poll_interval_s": "0.5",
                               "debounce_s": "0.1", "lora_scale": "0.5", "max_file_bytes": "1000",
                               "allow_pickle": "true"}, model_name="m")
    rig = make(rigs, tmp_path)
    w = WeightsWatcher.from_settings(settings, rig.coord)
    assert (w.mode, w.poll_interval_s, w.debounce_s, w.lora_scale) == ("polling", 0.5, 0.1, 0.5)
    assert w.policy.max_bytes == 1000 and w.policy.allow_pickle and w.policy.root == tmp_path


def test_the_watcher_checks_its_timing_by_the_settings_bounds(tmp_path: Path, rigs: list[Rig]) -> None:
    from serving.errors import ConfigError

    rig = make(rigs, tmp_path)
    with pytest.raises(ConfigError) as e:
        WeightsWatcher(tmp_path, rig.coord, poll_interval_s=0.001, debounce_s=-1, settle_s=-1, max_files=0)
    assert str(e.value) == ("invalid watcher timing: poll_interval_s=0.001 (must be >= 0.01), debounce_s=-1 "
                            "(must be >= 0), settle_s=-1 (must be >= 0), max_files=0 (must be >= 1)")
    with pytest.raises(ConfigError, match="watch_mode 'fanotify'"):
        WeightsWatcher(tmp_path, rig.coord, mode="fanotify")


def test_cli_watch_installs_what_is_published_while_it_runs(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main
    from serving.examples import TRANSFORMER

    folder = tmp_path / "w"
    folder.mkdir()
    write_atomic(folder / "v1.safetensors", state(1))
    publisher = threading.Thread(target=lambda: write_atomic(folder / "v2.safetensors", state(2)), name="publisher")
    publisher.start()
    code = main(["watch", "--factory", TRANSFORMER, "--folder", str(folder), "--debounce", "0.05",
                 "--cache-dir", str(tmp_path / "cache"), "--metrics-port", "0", "--exit-after", "1.5"])
    publisher.join()
    out = capsys.readouterr().out
    assert code == 0
    assert "metrics on http://127.0.0.1:" in out
    assert "stopped; live weights: v2; rejected: none" in out


def test_a_large_new_checkpoint_is_read_once_before_it_goes_live_and_hashed_after(folder: Path,
                                                                                    rigs: list[Rig]) -> None:
    """Above prehash_max_bytes, new content goes live without a hash first; its identity is computed
    after, so a later copy of it is still a no-op and an earlier version a rollback."""
    rig = make(rigs, folder, prehash_max_bytes=0)
    v1 = rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    v2 = rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    rig.idle()
    record = rig.watcher.history[-1]
    assert record.version == "v2" and record.hashed_after  # hashed after it went live, not before
    assert rig.coord.live is not None and rig.coord.live.content_hash == content_hash_file(v2)
    rig.publish("v2-copy.safetensors", 2)  # seen before: hashed first, nothing to do
    wait_for(lambda: refits(rig.registry, "noop") == 1, "a no-op")
    shutil.copyfile(v1, folder / ".rollback.tmp")
    os.rename(folder / ".rollback.tmp", folder / "rollback.safetensors")
    rig.wait_live("rollback")
    rig.idle()
    assert rig.watcher.history[-1].report.tensors_refitted == 0  # the standby still held v1: a pointer switch
    assert_serves(rig, 1)
    rig.publish("v3.safetensors", 3)
    rig.wait_live("v3")
    shutil.copyfile(v2, folder / ".again.tmp")  # seen before, but neither live nor previous: nothing to reuse
    os.rename(folder / ".again.tmp", folder / "v2-again.safetensors")
    rig.wait_live("v2-again")
    rig.idle()
    assert rig.watcher.history[-1].hashed_after  # streamed first, hashed after
    assert_serves(rig, 2)
