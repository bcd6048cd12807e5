"""Files that must not hurt serving, each dropped into a watched folder (real watchdog, real files).

For every one: the old version keeps serving (the coordinator's outputs stay those of v1), the rejection
is logged once with a clear reason, counted in hotswap_refits_total{outcome="rejected",reason=...},
not read again until the file changes, and the file itself is left untouched.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from watch_helpers import Rig, expected, refits, safetensors_bytes, snapshot, state, wait_for, write_atomic

import serving.weights.checkpoint as checkpoint_mod
from serving.weights import CheckpointPolicy
from serving.weights.fastpath import FastReader, ReadStats, TensorSource


def serving_v1(rigs: list[Rig], folder: Path, **kw: object) -> Rig:
    rig = Rig(folder, **kw)  # type: ignore[arg-type]
    rigs.append(rig)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    return rig


def assert_refused_once(rig: Rig, path: Path, reason: str, needle: str, caplog: pytest.LogCaptureFixture) -> None:
    """The common contract, checked after the hostile entry was published."""
    before = snapshot(path)
    assert rig.wait_rejected(path) == reason
    rejection = rig.watcher.rejection(path)
    assert rejection is not None and needle in rejection.message, rejection
    torch.testing.assert_close(rig.output(), expected(1), rtol=0, atol=0)  # v1 still serves
    # an event that changes nothing (attributes rewritten as they were): not read again
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    rig.publish("v2.safetensors", 2)
    rig.wait_live("v2")
    rig.idle()
    assert refits(rig.registry, "rejected", reason) == 1
    assert refits(rig.registry, "rejected") == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert snapshot(path) == before  # never modified, never deleted


def _lying_offsets() -> bytes:
    """A real header whose offsets make two tensors overlap (and leave bytes nobody owns)."""
    data = safetensors_bytes(state(2))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size_b]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _with(change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    tensors = {k: v.clone() for k, v in state(2).items()}
    change(tensors)
    return safetensors_bytes(tensors)


def _nan_inf(t: dict[str, torch.Tensor]) -> None:
    t["blocks.0.fc1.weight"][3, 4] = float("nan")
    t["head.bias"][0] = float("inf")


def _wrong_shape(t: dict[str, torch.Tensor]) -> None:
    t["head.weight"] = torch.zeros(7, 64)


def _wrong_dtype(t: dict[str, torch.Tensor]) -> None:
    t["head.bias"] = torch.zeros(5, dtype=torch.int32)


def _missing_and_extra(t: dict[str, torch.Tensor]) -> None:
    del t["blocks.1.fc2.bias"]
    t["blocks.1.fc3.bias"] = torch.zeros(64)


STATIC: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("truncated", lambda: safetensors_bytes(state(2))[:200_000], "corrupt", "beyond the end of the file"),
    ("random-bytes", lambda: os.urandom(4096), "corrupt", "not a valid safetensors file"),
    ("lying-offsets", _lying_offsets, "corrupt", "overlap"),
    ("nan-inf", lambda: _with(_nan_inf), "invalid", "1 NaN value(s), first at index (3, 4)"),
    ("wrong-shape", lambda: _with(_wrong_shape), "invalid", "expected shape (5, 64), found (7, 64)"),
    ("wrong-dtype", lambda: _with(_wrong_dtype), "invalid", "expected dtype float32, found int32"),
    ("missing-and-extra", lambda: _with(_missing_and_extra), "invalid", "'blocks.1.fc2.bias': missing"),
    ("zero-bytes", lambda: b"", "empty", "empty file (0 bytes)"),
]


@pytest.mark.parametrize(("name", "make", "reason", "needle"), STATIC, ids=[s[0] for s in STATIC])
def test_bad_checkpoint_files_are_refused(folder: Path, rigs: list[Rig], caplog: pytest.LogCaptureFixture,
                                          name: str, make: Callable[[], bytes], reason: str, needle: str) -> None:
    rig = serving_v1(rigs, folder)
    path = write_atomic(folder / f"{name}.safetensors", make(), mtime_ns=rig.clock.next())
    assert_refused_once(rig, path, reason, needle, caplog)


def test_a_refused_file_is_read_again_once_it_changes(folder: Path, rigs: list[Rig]) -> None:
    rig = serving_v1(rigs, folder)
    path = write_atomic(folder / "v3.safetensors", safetensors_bytes(state(3))[:100_000], mtime_ns=rig.clock.next())
    assert rig.wait_rejected(path) == "corrupt"
    write_atomic(path, state(3), mtime_ns=rig.clock.next())  # the complete file, published again
    rig.wait_live("v3")
    torch.testing.assert_close(rig.output(), expected(3), rtol=0, atol=0)
    assert str(path) not in rig.watcher.rejected


def test_pickle_is_refused_unless_enabled(folder: Path, rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    path = folder / "model.pt"
    torch.save(state(2), folder / ".model.pt.tmp")
    os.rename(folder / ".model.pt.tmp", path)
    assert_refused_once(rig, path, "unsupported", "torch pickle checkpoints are refused", caplog)


class _Evil:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickle_carrying_code_never_executes(folder: Path, rigs: list[Rig], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    policy = CheckpointPolicy(allow_pickle=True)
    rig = serving_v1(rigs, folder, policy=policy)
    marker = tmp_path / "pwned"
    evil = {**state(2), "head.bias": _Evil(marker)}
    with open(folder / ".evil.tmp", "wb") as f:
        torch.save(evil, f)
    path = folder / "evil.pt"
    os.rename(folder / ".evil.tmp", path)
    assert_refused_once(rig, path, "unsafe_pickle", "nothing from it was executed", caplog)
    assert not marker.exists()
    # a plain state dict pickle is accepted when enabled (weights_only=True)
    torch.save(state(4), folder / ".ok.tmp")
    os.rename(folder / ".ok.tmp", folder / "ok.pt")
    rig.wait_live("ok")
    torch.testing.assert_close(rig.output(), expected(4), rtol=0, atol=0)


def test_symlink_pointing_outside_the_folder(folder: Path, rigs: list[Rig], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    outside = write_atomic(tmp_path / "outside.safetensors", state(2))
    target_before = snapshot(outside)
    path = folder / "link.safetensors"
    os.symlink(outside, folder / ".link.tmp")
    os.rename(folder / ".link.tmp", path)
    assert_refused_once(rig, path, "outside_root", "points outside the weights folder", caplog)
    assert snapshot(outside) == target_before


def test_symlink_inside_a_version_directory_pointing_outside(folder: Path, rigs: list[Rig], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    outside = write_atomic(tmp_path / "outside.safetensors", state(2))
    tmp = folder / ".v9.tmp"
    tmp.mkdir()
    os.symlink(outside, tmp / "model.safetensors")
    path = folder / "v9"
    os.rename(tmp, path)
    assert_refused_once(rig, path, "outside_root", "symlink pointing outside", caplog)


def test_file_larger_than_the_cap(folder: Path, rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    policy = CheckpointPolicy(max_bytes=1_000_000)
    rig = serving_v1(rigs, folder, policy=policy)
    big = {**state(2), "extra.padding": torch.zeros(300_000)}
    path = write_atomic(folder / "big.safetensors", big, mtime_ns=rig.clock.next())
    assert_refused_once(rig, path, "too_large", "over the cap of 1000000", caplog)


def test_directory_of_thousands_of_files(folder: Path, rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    tmp = folder / ".many.tmp"
    tmp.mkdir()
    for i in range(3000):
        (tmp / f"f{i:04d}.safetensors").touch()
    path = folder / "many"
    os.rename(tmp, path)
    assert_refused_once(rig, path, "too_many_files", "more than 1000 files", caplog)


def test_fifo_does_not_block_the_watcher(folder: Path, rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    path = folder / "pipe.safetensors"
    os.mkfifo(path)
    assert_refused_once(rig, path, "unsupported", "not a regular file", caplog)


def test_sharded_index_pointing_outside(folder: Path, rigs: list[Rig], tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    rig = serving_v1(rigs, folder)
    write_atomic(tmp_path / "outside.safetensors", state(2))
    tmp = folder / ".sharded.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(state(2), "../../outside.safetensors")}))
    path = folder / "sharded"
    os.rename(tmp, path)
    assert_refused_once(rig, path, "outside_root", "point outside the checkpoint directory", caplog)


def before_reading(monkeypatch: pytest.MonkeyPatch, name: str, action: Callable[[Path], None]) -> None:
    """Call ``action`` with the checkpoint file called ``name`` just before its tensors are read (after the
    reader's first look at the file), on either path: the host path's reader and the fast path's."""
    host, fast = checkpoint_mod._read_safetensors, FastReader.read_into

    def host_read(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
        if file.name == name:
            action(file)
        return host(file, names)

    def fast_read(self: FastReader, sources: Sequence[TensorSource], *args: Any, **kw: Any) -> ReadStats:
        for file in dict.fromkeys(Path(s.file) for s in sources):
            if file.name == name:
                action(file)
        return fast(self, sources, *args, **kw)

    monkeypatch.setattr(checkpoint_mod, "_read_safetensors", host_read)
    monkeypatch.setattr(FastReader, "read_into", fast_read)


@pytest.mark.parametrize("fast_path", [False, True], ids=["host", "fast"])
def test_file_deleted_while_being_read(folder: Path, rigs: list[Rig], monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture, fast_path: bool) -> None:
    rig = serving_v1(rigs, folder, fast_path=fast_path)
    before_reading(monkeypatch, "doomed.safetensors", os.unlink)
    rig.publish("doomed.safetensors", 2)
    wait_for(lambda: refits(rig.registry, "rejected", "changed_during_read") == 1, "the rejection")
    rig.publish("v3.safetensors", 3)
    rig.wait_live("v3")
    rig.idle()
    torch.testing.assert_close(rig.output(), expected(3), rtol=0, atol=0)
    assert refits(rig.registry, "rejected") == 1 and not rig.watcher.rejected  # the file is gone: nothing to keep
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "doomed" in r.getMessage()]
    assert len(warnings) == 1 and "deleted" in warnings[0].getMessage()


@pytest.mark.parametrize("fast_path", [False, True], ids=["host", "fast"])
def test_file_rewritten_while_being_read_installs_the_final_content(folder: Path, rigs: list[Rig],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    fast_path: bool) -> None:
    rig = serving_v1(rigs, folder, fast_path=fast_path)
    rewritten: list[Path] = []
    served_during: list[torch.Tensor] = []

    def rewrite_first(file: Path) -> None:
        if not rewritten:
            rewritten.append(file)
            with open(file, "r+b") as f:  # in place, as a careless writer would
                f.write(safetensors_bytes(state(3)))
            served_during.append(rig.output())

    before_reading(monkeypatch, "next.safetensors", rewrite_first)
    rig.publish("next.safetensors", 2)
    wait_for(lambda: refits(rig.registry, "rejected", "changed_during_read") == 1, "the mixed read is refused")
    wait_for(lambda: refits(rig.registry, "success") == 2, "the final content is installed")
    torch.testing.assert_close(served_during[0], expected(1), rtol=0, atol=0)
    torch.testing.assert_close(rig.output(), expected(3), rtol=0, atol=0)


def test_permission_denied(rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    """A file the server's user cannot read. Root reads anything, so as root the whole process drops its
    effective uid to nobody while the file is published and judged (every thread: glibc applies seteuid to
    all of them, and the capabilities go with the uid)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="hotswap-perm-"))
    try:
        os.chmod(base, 0o755)
        folder = base / "weights"
        folder.mkdir()
        os.chmod(folder, 0o777)
        rig = serving_v1(rigs, folder)
        tmp = folder / ".locked.tmp"
        tmp.write_bytes(safetensors_bytes(state(2)))
        os.chmod(tmp, 0)
        path = folder / "locked.safetensors"
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            os.rename(tmp, path)
            wait_for(lambda: str(path) in rig.watcher.rejected, "the unreadable file is refused")
        finally:
            if as_root:
                os.seteuid(0)
        assert rig.watcher.rejected[str(path)] == "unreadable"
        rejection = rig.watcher.rejection(path)
        assert rejection is not None and "permission denied" in rejection.message
        torch.testing.assert_close(rig.output(), expected(1), rtol=0, atol=0)
        assert refits(rig.registry, "rejected", "unreadable") == 1
        assert os.stat(path).st_mode & 0o777 == 0  # left as it was
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]
        assert len(warnings) == 1
        os.chmod(path, 0o644)  # the fix is a change: read again, installed
        rig.wait_live("locked")
        torch.testing.assert_close(rig.output(), expected(2), rtol=0, atol=0)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
