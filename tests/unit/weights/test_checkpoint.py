"""detect_checkpoint / describe_checkpoint / read_tensors against real files in tmp_path."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import serving.weights.checkpoint as checkpoint_mod
from serving.errors import CheckpointError, ValidationError
from serving.weights import TensorMeta
from serving.weights.checkpoint import (
    CheckpointCandidate,
    CheckpointPolicy,
    describe_checkpoint,
    detect_checkpoint,
    from_little_endian,
    read_tensors,
)

from .helpers import SafeOpenSpy, raw_safetensors, save, save_sharded, tiny_state_dict, write_index

POLICY = CheckpointPolicy()
PICKLES = CheckpointPolicy(allow_pickle=True)


def _layout(metas: dict[str, TensorMeta]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (m.shape, m.dtype) for k, m in metas.items()}


def _reason(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    return excinfo.value.reason


def _shards(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = tiny_state_dict()
    names = list(sd)
    half = len(names) // 2
    directory = save_sharded(tmp_path / "sharded-v2", {
        "model-00001-of-00002.safetensors": {k: sd[k] for k in names[:half]},
        "model-00002-of-00002.safetensors": {k: sd[k] for k in names[half:]},
    })
    return directory, sd


# ------------------------------------------------------------------ single files and directories


def test_single_file(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    path = save(tmp_path / "run-3.safetensors", sd)
    c = detect_checkpoint(path, POLICY)
    assert (c.format, c.version, c.path, c.files) == ("safetensors", "run-3", path, (path.resolve(),))
    assert c.nbytes == path.stat().st_size
    metas = describe_checkpoint(c, POLICY)
    assert _layout(metas) == {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    got = read_tensors(c, ["0.weight", "2.bias"], POLICY)
    assert list(got) == ["0.weight", "2.bias"]
    assert torch.equal(got["0.weight"], sd["0.weight"]) and torch.equal(got["2.bias"], sd["2.bias"])
    assert all(t.device.type == "cpu" for t in got.values())


def test_tensors_read_do_not_follow_later_writes_to_the_file(tmp_path: Path) -> None:
    """read_tensors hands out tensors owning their memory: later writes to the file do not reach them."""
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(64)})
    got = read_tensors(detect_checkpoint(path, POLICY), ["w"], POLICY)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # overwrite the data in place, then truncate it away
        f.seek(size - 256)
        f.write(b"\0" * 256)
    os.truncate(path, 8)
    assert torch.equal(got["w"], torch.ones(64))


def test_version_override(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    assert detect_checkpoint(path, POLICY, version="v42").version == "v42"


def test_directory_with_model_safetensors(tmp_path: Path) -> None:
    save(tmp_path / "ckpt-7" / "model.safetensors", {"w": torch.ones(2)})
    c = detect_checkpoint(tmp_path / "ckpt-7", POLICY)
    assert (c.format, c.version, c.files[0].name) == ("safetensors", "ckpt-7", "model.safetensors")


def test_directory_with_one_other_safetensors_file(tmp_path: Path) -> None:
    save(tmp_path / "d" / "weights.safetensors", {"w": torch.ones(2)})
    (tmp_path / "d" / "README.md").write_text("hi")
    assert detect_checkpoint(tmp_path / "d", POLICY).files[0].name == "weights.safetensors"


def test_hidden_temporaries_are_not_candidates(tmp_path: Path) -> None:
    save(tmp_path / "d" / "weights.safetensors", {"w": torch.ones(2)})
    save(tmp_path / "d" / ".next.safetensors", {"w": torch.zeros(2)})  # a publisher mid-write
    assert detect_checkpoint(tmp_path / "d", POLICY).files[0].name == "weights.safetensors"


def test_directory_with_two_files_and_no_index_is_ambiguous(tmp_path: Path) -> None:
    save(tmp_path / "d" / "a.safetensors", {"w": torch.ones(2)})
    save(tmp_path / "d" / "b.safetensors", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="2 .safetensors files without an index") as info:
        detect_checkpoint(tmp_path / "d", POLICY)
    assert _reason(info) == "unsupported"


def test_directory_with_index_and_single_file_is_ambiguous(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path)
    save(directory / "model.safetensors", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="ambiguous") as info:
        detect_checkpoint(directory, POLICY)
    assert _reason(info) == "unsupported"


@pytest.mark.parametrize("name", ["weights.npz", "weights", "model.onnx"])
def test_unknown_format_lists_the_accepted_ones(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="accepted formats") as info:
        detect_checkpoint(tmp_path / name, POLICY)
    assert _reason(info) == "unsupported"


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint") as info:
        detect_checkpoint(tmp_path / "d", POLICY)
    assert _reason(info) == "unsupported"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        detect_checkpoint(tmp_path / "nope.safetensors", POLICY)
    assert _reason(info) == "not_found"


def test_dangling_symlink_is_named_as_published(tmp_path: Path) -> None:
    link = tmp_path / "v1.safetensors"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=r"v1\.safetensors: does not exist \(or is a dangling symlink\)") as info:
        detect_checkpoint(link, POLICY)
    assert _reason(info) == "not_found"


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block: detect must not
    with pytest.raises(CheckpointError, match="not a regular file") as info:
        detect_checkpoint(fifo, POLICY)
    assert _reason(info) == "unsupported"


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").touch()
    with pytest.raises(CheckpointError, match="0 bytes") as info:
        detect_checkpoint(tmp_path / "m.safetensors", POLICY)
    assert _reason(info) == "empty"


def test_size_cap(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(1000)})
    with pytest.raises(CheckpointError, match="max_bytes") as info:
        detect_checkpoint(path, CheckpointPolicy(max_bytes=1000))
    assert _reason(info) == "too_large"
    assert detect_checkpoint(path, CheckpointPolicy(max_bytes=path.stat().st_size)).format == "safetensors"


def test_size_cap_counts_every_shard(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path)
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    biggest = max(p.stat().st_size for p in directory.glob("*.safetensors"))
    with pytest.raises(CheckpointError) as info:
        detect_checkpoint(directory, CheckpointPolicy(max_bytes=biggest + 1))
    assert _reason(info) == "too_large"
    assert detect_checkpoint(directory, CheckpointPolicy(max_bytes=total)).format == "sharded"


# ------------------------------------------------------------------ symlinks and the root


def test_symlink_outside_root_is_refused(tmp_path: Path) -> None:
    outside = save(tmp_path / "elsewhere" / "secret.safetensors", {"w": torch.ones(2)})
    root = tmp_path / "root"
    root.mkdir()
    (root / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the allowed root") as info:
        detect_checkpoint(root / "model.safetensors", CheckpointPolicy(root=root))
    assert _reason(info) == "outside_root"
    # the same link with no root configured is followed
    assert detect_checkpoint(root / "model.safetensors", POLICY).files == (outside.resolve(),)


def test_symlink_inside_root_is_followed_and_names_the_version(tmp_path: Path) -> None:
    target = save(tmp_path / "v7.safetensors", {"w": torch.ones(2)})
    (tmp_path / "current.safetensors").symlink_to(target)
    c = detect_checkpoint(tmp_path / "current.safetensors", CheckpointPolicy(root=tmp_path))
    assert c.version == "v7" and c.files == (target.resolve(),)


def test_directory_outside_root(tmp_path: Path) -> None:
    save(tmp_path / "other" / "model.safetensors", {"w": torch.ones(2)})
    (tmp_path / "root").mkdir()
    with pytest.raises(CheckpointError) as info:
        detect_checkpoint(tmp_path / "other", CheckpointPolicy(root=tmp_path / "root"))
    assert _reason(info) == "outside_root"


def test_shard_symlink_outside_root(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path / "root")
    shard = directory / "model-00002-of-00002.safetensors"
    moved = tmp_path / "outside.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    with pytest.raises(CheckpointError, match="outside the allowed root") as info:
        detect_checkpoint(directory, CheckpointPolicy(root=tmp_path / "root"))
    assert _reason(info) == "outside_root"


# ------------------------------------------------------------------ sharded


def test_sharded_directory(tmp_path: Path) -> None:
    directory, sd = _shards(tmp_path)
    c = detect_checkpoint(directory, POLICY)
    assert (c.format, c.version, c.path) == ("sharded", "sharded-v2", directory)
    assert [f.name for f in c.files] == ["model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors"]
    metas = describe_checkpoint(c, POLICY)
    assert set(metas) == set(sd)
    assert Path(metas["0.weight"].file).name == "model-00001-of-00002.safetensors"
    assert Path(metas["2.bias"].file).name == "model-00002-of-00002.safetensors"
    got = read_tensors(c, list(sd), POLICY)
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_sharded_through_a_symlinked_directory(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path)
    (tmp_path / "current").symlink_to(directory)
    c = detect_checkpoint(tmp_path / "current", CheckpointPolicy(root=tmp_path))
    assert (c.path, c.version) == (tmp_path / "current", "sharded-v2")
    assert all(f.parent == directory.resolve() for f in c.files)


def test_sharded_reads_only_the_shards_it_needs(tmp_path: Path, spy: SafeOpenSpy) -> None:
    directory, _ = _shards(tmp_path)
    got = read_tensors(detect_checkpoint(directory, POLICY), ["2.bias"], POLICY)
    assert list(got) == ["2.bias"]
    assert spy.opened == ["model-00002-of-00002.safetensors"] and spy.read == ["2.bias"]


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors"])
def test_shard_escaping_the_directory_is_refused(tmp_path: Path, bad: str) -> None:
    directory, sd = _shards(tmp_path)
    save(tmp_path / "x.safetensors", {"w": torch.ones(2)})  # the file exists: refusal is by name
    write_index(directory, {"w": bad, **dict.fromkeys(sd, "model-00001-of-00002.safetensors")})
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as info:
        detect_checkpoint(directory, POLICY)
    assert _reason(info) == "outside_root"


def test_shard_missing(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist") as info:
        detect_checkpoint(directory, POLICY)
    assert _reason(info) == "not_found"


def test_index_and_shards_disagree(tmp_path: Path) -> None:
    directory, sd = _shards(tmp_path)
    weight_map = dict.fromkeys(sd, "model-00001-of-00002.safetensors")  # claims everything is in shard 1
    write_index(directory, weight_map)
    c = detect_checkpoint(directory, POLICY)
    with pytest.raises(CheckpointError, match="disagree") as info:
        describe_checkpoint(c, POLICY)
    assert _reason(info) == "corrupt"
    assert "'2.bias'" in str(info.value)


@pytest.mark.parametrize("text", ["not json", '{"metadata": {}}', '{"weight_map": {}}',
                                  '{"weight_map": {"a": 3}}'])
def test_bad_index(tmp_path: Path, text: str) -> None:
    directory, _ = _shards(tmp_path)
    (directory / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as info:
        detect_checkpoint(directory, POLICY)
    assert _reason(info) == "corrupt"


def test_shard_that_is_not_safetensors(tmp_path: Path) -> None:
    directory, sd = _shards(tmp_path)
    write_index(directory, dict.fromkeys(sd, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="not .safetensors") as info:
        detect_checkpoint(directory, POLICY)
    assert _reason(info) == "unsupported"


# ------------------------------------------------------------------ torch pickles


class _Evil:
    """Unpickling this creates a marker file (the classic pickle code-execution payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


def test_pickle_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_state_dict(), path)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as info:
        detect_checkpoint(path, POLICY)
    assert _reason(info) == "unsupported"


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_loaded_when_enabled(tmp_path: Path, zipped: bool) -> None:
    sd = tiny_state_dict()
    path = tmp_path / "model.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zipped)
    c = detect_checkpoint(path, PICKLES)
    assert (c.format, c.version) == ("torch", "model")
    metas = describe_checkpoint(c, PICKLES)
    assert _layout(metas) == {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    got = read_tensors(c, ["0.weight"], PICKLES)
    assert list(got) == ["0.weight"] and torch.equal(got["0.weight"], sd["0.weight"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    payload = {"w": torch.ones(2), "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    c = detect_checkpoint(path, PICKLES)
    for step in (lambda: describe_checkpoint(c, PICKLES), lambda: read_tensors(c, ["w"], PICKLES)):
        with pytest.raises(CheckpointError, match="nothing from it was executed") as info:
            step()
        assert _reason(info) == "unsafe_pickle"
        assert not marker.exists()


def test_the_malicious_payload_is_real(tmp_path: Path) -> None:
    """Control for the test above: a plain unpickle of the same bytes does create the marker."""
    marker = tmp_path / "pwned"
    data = pickle.dumps({"x": _Evil(marker)})
    pickle.loads(data)  # noqa: S301 - deliberately unsafe, on our own payload
    assert marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": tiny_state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="flat state dict") as info:
        describe_checkpoint(detect_checkpoint(path, PICKLES), PICKLES)
    assert _reason(info) == "corrupt"


def test_garbage_pickle_is_corrupt_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(CheckpointError) as info:
        describe_checkpoint(detect_checkpoint(path, PICKLES), PICKLES)
    assert _reason(info) == "corrupt"


# ------------------------------------------------------------------ unreadable


def test_unreadable_file(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not make the file unreadable")
        with pytest.raises(CheckpointError, match="permission denied") as info:
            detect_checkpoint(path, POLICY)
        assert _reason(info) == "unreadable"
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above, but works as root: opening the file raises PermissionError."""
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    real_open = builtins.open

    def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "open", deny, raising=False)
    with pytest.raises(CheckpointError, match="permission denied") as info:
        detect_checkpoint(path, POLICY)
    assert _reason(info) == "unreadable"


# ------------------------------------------------------------------ changes during the read


def test_file_replaced_during_read(tmp_path: Path, spy: SafeOpenSpy) -> None:
    sd = tiny_state_dict()
    path = save(tmp_path / "m.safetensors", sd)
    c = detect_checkpoint(path, POLICY)

    def replace(file: str, name: str) -> None:
        if spy.read == [name]:  # after the first tensor: a writer renames a new version into place
            save(tmp_path / "tmp.safetensors", tiny_state_dict(seed=1))
            os.replace(tmp_path / "tmp.safetensors", path)

    spy.on_get = replace
    with pytest.raises(CheckpointError, match="changed while it was being read") as info:
        read_tensors(c, list(sd), POLICY)
    assert _reason(info) == "changed_during_read"


def test_file_rewritten_in_place_during_read(tmp_path: Path, spy: SafeOpenSpy) -> None:
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(4), "b": torch.ones(4)})
    c = detect_checkpoint(path, POLICY)
    before = path.stat()

    def rewrite(file: str, name: str) -> None:
        with open(path, "r+b") as f:  # same inode, same size, new bytes, new mtime
            f.seek(before.st_size - 4)
            f.write(b"\0\0\0\0")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))

    spy.on_get = rewrite
    with pytest.raises(CheckpointError) as info:
        read_tensors(c, ["a", "b"], POLICY)
    assert _reason(info) == "changed_during_read"


def test_file_deleted_during_read(tmp_path: Path, spy: SafeOpenSpy) -> None:
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(4), "b": torch.ones(4)})
    c = detect_checkpoint(path, POLICY)
    spy.on_get = lambda file, name: path.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="deleted") as info:
        read_tensors(c, ["a", "b"], POLICY)
    assert _reason(info) == "changed_during_read"


def test_file_truncated_during_read_is_refused_and_does_not_fault_the_process(tmp_path: Path,
                                                                             spy: SafeOpenSpy) -> None:
    """Read through a mapping, the second tensor would fault the process (SIGBUS): a Triton stub would die."""
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(4096), "b": torch.ones(4096)})
    c = detect_checkpoint(path, POLICY)
    header_end = path.stat().st_size - 2 * 4096 * 4
    spy.on_get = lambda file, name: os.truncate(path, header_end)  # after the first tensor: the data is gone
    with pytest.raises(CheckpointError, match=r"tensor 'b': 0 of its 16384 bytes could be read: the file was "
                                              r"truncated while it was being read") as info:
        read_tensors(c, ["a", "b"], POLICY)
    assert _reason(info) == "changed_during_read" and str(path) in str(info.value)


def test_file_changed_between_detect_and_read(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    c = detect_checkpoint(path, POLICY)
    save(tmp_path / "tmp.safetensors", {"w": torch.zeros(4)})
    os.replace(tmp_path / "tmp.safetensors", path)
    with pytest.raises(CheckpointError, match="since it was detected") as info:
        read_tensors(c, ["w"], POLICY)
    assert _reason(info) == "changed_during_read"
    with pytest.raises(CheckpointError) as info:
        describe_checkpoint(c, POLICY)
    assert _reason(info) == "changed_during_read"


# ------------------------------------------------------------------ read_tensors errors


def test_reading_a_name_that_is_not_there(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    with pytest.raises(ValidationError, match="'nope'"):
        read_tensors(detect_checkpoint(path, POLICY), ["w", "nope"], POLICY)
    directory, _ = _shards(tmp_path)
    with pytest.raises(ValidationError, match="'nope'"):
        read_tensors(detect_checkpoint(directory, POLICY), ["nope"], POLICY)


def test_a_lying_header_is_refused_when_read_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lie.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(raw_safetensors(header, b"\0" * 24))
    c = CheckpointCandidate(path, "lie", "safetensors", (path,))  # built by hand: detect never ran
    with pytest.raises(CheckpointError, match="'b'.* overlap tensor 'a'") as info:
        read_tensors(c, ["a"], POLICY)
    assert _reason(info) == "corrupt" and str(path) in str(info.value)


def test_reading_a_checkpoint_over_and_over_keeps_nothing(tmp_path: Path) -> None:
    """A server reads a checkpoint at every swap, for months: nothing of a read may stay behind (safetensors'
    own ``get_tensor`` kept about 70 bytes per tensor, forever)."""
    import gc
    import tracemalloc

    names = [f"t{i}" for i in range(50)]
    c = detect_checkpoint(save(tmp_path / "m.safetensors", {n: torch.full((3,), float(i)) for i, n in
                                                            enumerate(names)}), POLICY)
    for _ in range(50):  # caches warmed
        read_tensors(c, names, POLICY)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(500):
            got = read_tensors(c, names, POLICY)
        assert torch.equal(got["t7"], torch.full((3,), 7.0))
        del got
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 50_000, f"{kept} bytes kept after 500 reads of 50 tensors"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_little_endian_bytes_become_a_big_endian_machines_values(dtype: torch.dtype) -> None:
    values = torch.arange(6).to(dtype).reshape(2, 3)
    as_big_endian = values.view(-1).view(torch.uint8).view(-1, values.element_size()).flip(1).contiguous()
    swapped = from_little_endian(as_big_endian.view(dtype).view(2, 3))
    assert torch.equal(swapped.view(-1).view(torch.uint8), values.view(-1).view(torch.uint8))
