"""KvikIO's side of the fast path against a fake of the library (host buffers; the real library on a GPU:
tests/gpu/test_kvikio_cuda.py): where the bytes go, the bounded scratch, the errors, the settings it leaves."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serving.errors import CheckpointError, ConfigError
from serving.specs import WeightSpec
from serving.weights.fastpath import FastPathConfig, FastReader, allocate, read_checkpoint_into, tensor_sources
from serving.weights.kvikio_reader import SLOTS, gds_state, load_kvikio, probe, read_error
from serving.weights.loader import load_weights, open_checkpoint
from serving.weights.plan import Piece, Step

from .fake_kvikio import FakeKvikIO

CONFIG = FastPathConfig(threads=3, buffers=2, buffer_bytes=1 << 20, task_bytes=8192, transfer="kvikio")


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(600, 1000, generator=g),  # 2.4 MB: larger than the whole scratch
        "half": torch.randn(70_001, generator=g).half(),
        "flag": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }


def specs_of(sd: dict[str, torch.Tensor]) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.fixture
def fake() -> Iterator[FakeKvikIO]:
    f = FakeKvikIO()
    yield f
    f.shutdown()


@pytest.fixture
def reader(fake: FakeKvikIO) -> Iterator[FastReader]:
    r = FastReader(CONFIG, kvikio_loader=lambda: (fake, "imported"))
    yield r
    r.close()


def write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file(sd, str(path))
    return path


def test_tensors_in_the_engine_dtype_are_read_straight_into_their_destinations(
        tmp_path: Path, reader: FastReader, fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    specs["half"] = WeightSpec("half", (70_001,), torch.float32)  # cast: through the scratch
    dest = allocate(specs, "cpu")
    loaded = load_weights(path, specs, out=dest, reader=reader)
    assert loaded.stats is not None and loaded.stats.transfer == "kvikio" and loaded.stats.cast == ("half",)
    for name in ("big", "flag", "ids"):
        assert torch.equal(dest[name], sd[name]), name
        calls = [c for c in fake.calls if c[1] == dest[name].data_ptr()]
        assert [(c[2], c[4]) for c in calls] == [(sd[name].nbytes, CONFIG.task_bytes)], name  # one pread, whole
    assert torch.equal(dest["half"], sd["half"].float())
    scratch = [c for c in fake.calls if c[1] not in {t.data_ptr() for t in dest.values()}]
    assert sum(c[2] for c in scratch[1:]) == sd["half"].nbytes  # [0] is the probe
    assert all(c[2] <= CONFIG.buffer_bytes for c in scratch)


def test_a_scan_goes_through_a_scratch_bounded_by_the_chunk_not_the_model(
        tmp_path: Path, reader: FastReader, fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    stats = read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader)
    model = sum(t.nbytes for t in sd.values())
    held = reader._kvikio.scratch_bytes() if reader._kvikio is not None else -1
    assert held == SLOTS * CONFIG.buffer_bytes < model
    reads = fake.calls[1:]
    assert sum(c[2] for c in reads) == sd["big"].nbytes + sd["half"].nbytes  # floats only: ints cannot be NaN
    assert all(c[2] <= CONFIG.buffer_bytes for c in reads) and stats.chunks == len(reads)


def test_settings_are_restored_and_the_threads_stop_on_close(tmp_path: Path, fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    before = dict(fake.defaults.values)
    reader = FastReader(CONFIG, kvikio_loader=lambda: (fake, "imported"))
    for _ in range(2):  # kept across reads
        load_weights(path, specs_of(sd), reader=reader)
        assert fake.defaults.values == {"num_threads": 3, "task_size": 8192}
    assert fake.live_threads() == 3
    reader.close()
    assert fake.defaults.values == before and fake.live_threads() == 0 and fake.freed == 1


def test_a_file_cut_short_during_the_read_names_the_tensor(tmp_path: Path, reader: FastReader,
                                                            fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    sources = tensor_sources(checked.metas, checked.needed)
    big = next(s for s in sources if s.name == "big")
    cut = big.offset + big.nbytes // 2

    def truncate(file: str, offset: int, size: int) -> None:
        if offset == big.offset:
            os.truncate(file, cut)

    fake.before_read = truncate
    with pytest.raises(CheckpointError) as e:
        reader.read_into(sources, specs, allocate(specs, "cpu"), source=str(path))
    assert e.value.reason == "corrupt"
    assert f"the file ends at byte {cut} but its header places tensor 'big' up to byte {big.offset + big.nbytes}" \
        in str(e.value)
    fake.before_read = None
    good = write(tmp_path / "good.safetensors", sd)  # the reader recovers
    assert torch.equal(load_weights(good, specs, reader=reader).tensors["big"], sd["big"])


def test_a_small_read_that_fails_in_the_caller_names_the_tensor(tmp_path: Path, reader: FastReader,
                                                                fake: FakeKvikIO) -> None:
    """Below KvikIO's gds_threshold the read runs in our thread and pread itself raises."""
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    sources = tensor_sources(open_checkpoint(path, specs).metas, list(specs))
    ids = next(s for s in sources if s.name == "ids")
    assert ids.nbytes < fake.gds_threshold

    def truncate(file: str, offset: int, size: int) -> None:
        if offset == ids.offset:
            os.truncate(file, ids.offset + 3)

    fake.before_read = truncate
    with pytest.raises(CheckpointError) as e:
        reader.read_into(sources, specs, allocate(specs, "cpu"), source=str(path))
    assert e.value.reason == "corrupt"
    assert f"ends at byte {ids.offset + 3} but its header places tensor 'ids' up to byte {ids.offset + ids.nbytes}" \
        in str(e.value)


def test_a_file_rewritten_while_read_is_refused_as_changed(tmp_path: Path, reader: FastReader,
                                                           fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    data = path.read_bytes()

    def rewrite(file: str, offset: int, size: int) -> None:
        fake.before_read = None
        path.write_bytes(data)  # same size and bytes; a writer still at work all the same
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    fake.before_read = rewrite
    with pytest.raises(CheckpointError, match="changed while it was being read") as e:
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, allocate(specs, "cpu"),
                             reader=reader)
    assert e.value.reason == "changed_during_read"


def test_a_failed_read_names_the_file_the_range_and_the_tensor(tmp_path: Path, reader: FastReader,
                                                               fake: FakeKvikIO) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    sources = tensor_sources(open_checkpoint(path, specs).metas, list(specs))
    big = next(s for s in sources if s.name == "big")

    def fail(file: str, offset: int, nbytes: int) -> None:
        if offset == big.offset + 2 * CONFIG.task_bytes:
            raise RuntimeError("POSIX error on pread: Input/output error")

    fake.in_task = fail
    with pytest.raises(CheckpointError) as e:
        reader.read_into(sources, specs, allocate(specs, "cpu"), source=str(path))
    assert e.value.reason == "unreadable"
    assert f"{path}: reading bytes {big.offset}..{big.offset + big.nbytes} (tensor 'big') through KvikIO failed: " \
           "POSIX error on pread: Input/output error" in str(e.value)


def test_read_error_mapping() -> None:
    step = Step("/w/m.safetensors", 100, 300, (Piece("a", 0, 0, 100), Piece("b", 0, 100, 200)), direct=False, slot=0)
    short = read_error(RuntimeError("POSIX error on pread: EOF"), step, 250)
    assert short.reason == "corrupt" and "ends at byte 250" in str(short) and "tensor 'b' up to byte 400" in str(short)
    before = read_error(RuntimeError("POSIX error on pread: EOF"), step, 50)  # the file ends before the range
    assert "ends at byte 50" in str(before) and "tensor 'a' up to byte 200" in str(before)
    other = read_error(RuntimeError("boom"), step, 400)
    assert other.reason == "unreadable" and "bytes 100..400 (tensor 'a') through KvikIO failed: boom" in str(other)
    gone = read_error(RuntimeError("boom"), step, None)
    assert gone.reason == "unreadable"


def test_the_log_says_which_transfer_and_whether_gds_is_used(tmp_path: Path, reader: FastReader,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    with caplog.at_level(logging.INFO, logger="serving.weights.fastpath"):
        load_weights(path, specs_of(sd), reader=reader)
        load_weights(path, specs_of(sd), reader=reader)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("weights transfer")]
    assert said == ["weights transfer to cpu: kvikio (weights_transfer is 'kvikio'; KvikIO fake, GDS not used "
                    "(compat mode: no GPUDirect Storage here, reads go through KvikIO's pinned bounce buffers); "
                    "3 threads, 8 KiB tasks)"]  # once per device


def test_kvikio_by_name_without_the_library_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    sd = state()
    path = write(tmp_path / "m.safetensors", sd)
    specs = specs_of(sd)
    dest = {k: torch.full_like(v, 7) if v.dtype != torch.bool else torch.ones_like(v) for k, v in sd.items()}
    before = {k: v.clone() for k, v in dest.items()}
    reader = FastReader(CONFIG, kvikio_loader=lambda: (None, "kvikio does not import (ModuleNotFoundError: x)"))
    try:
        with pytest.raises(ConfigError, match=r"'kvikio': KvikIO cannot read here: kvikio does not import .*gpu-cu13"):
            load_weights(path, specs, out=dest, reader=reader)
    finally:
        reader.close()
    assert all(torch.equal(dest[k], before[k]) for k in dest)


def test_the_real_library_does_not_import_without_cuda() -> None:
    module, why = load_kvikio()
    if module is not None:
        pytest.skip("kvikio imports here")
    assert why.startswith("kvikio does not import (")


def test_probe_reads_a_real_file_and_says_why_not(tmp_path: Path, fake: FakeKvikIO) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(10_000))
    ok = probe(fake, str(path), torch.device("cpu"))
    assert ok.ok and ok.version == "fake" and not ok.gds and ok.gds_reason.startswith("compat mode")
    assert gds_state(fake) == (False, ok.gds_reason)

    class Wrong(FakeKvikIO):
        def _task(self, path: str, fd: int, view: memoryview, offset: int) -> int:
            return len(view)  # says it read, reads nothing

    wrong = Wrong()
    try:
        status = probe(wrong, str(path), torch.device("cpu"))
    finally:
        wrong.shutdown()
    assert not status.ok and "came back wrong" in status.reason
    fake.in_task = lambda *_: (_ for _ in ()).throw(RuntimeError("cuFile error"))
    status = probe(fake, str(path), torch.device("cpu"))
    assert not status.ok and "failed (RuntimeError: cuFile error)" in status.reason


def test_a_scratch_slot_is_refilled_only_once_its_casts_are_done(tmp_path: Path, fake: FakeKvikIO) -> None:
    """Reads run far ahead (large tasks, several threads); the cast tensors span many chunks of two slots."""
    config = FastPathConfig(threads=4, buffers=2, buffer_bytes=1 << 20, task_bytes=1 << 20, transfer="kvikio")
    g = torch.Generator().manual_seed(3)
    sd = {"a": torch.randn(1_300_000, generator=g), "b": torch.randn(700_000, generator=g)}
    path = write(tmp_path / "m.safetensors", sd)
    specs = {k: WeightSpec(k, tuple(v.shape), torch.float16) for k, v in sd.items()}
    reader = FastReader(config, kvikio_loader=lambda: (fake, "imported"))
    try:
        assert reader.config.threads * reader.config.task_bytes * 2 > 4 * config.buffer_bytes
        loaded = load_weights(path, specs, reader=reader)
    finally:
        reader.close()
    assert loaded.stats is not None and loaded.stats.chunks == 8
    for k, v in sd.items():
        assert torch.equal(loaded.tensors[k], v.half()), k


@pytest.mark.parametrize("kind", ["threads", "kvikio"])
def test_tensors_that_the_file_does_not_align_are_cast_and_checked(tmp_path: Path, fake: FakeKvikIO,
                                                                   kind: str) -> None:
    """A writer other than safetensors' own may put a float32 tensor at an offset that is not a multiple of 4;
    two tensors to cast share a scratch chunk."""
    from .helpers import raw_safetensors

    a = torch.tensor([0.5, 1.5, -2.0], dtype=torch.float16)
    b = torch.tensor([1.0, 2.0, 3.0, -4.0])
    header = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [6, 22]}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(raw_safetensors(header, a.numpy().tobytes() + b.numpy().tobytes()))
    specs = {"a": WeightSpec("a", (3,), torch.float32), "b": WeightSpec("b", (4,), torch.float16)}
    config = CONFIG if kind == "kvikio" else FastPathConfig(threads=2, buffers=2, buffer_bytes=1 << 20)
    reader = FastReader(config, kvikio_loader=lambda: (fake, "imported"))
    try:
        loaded = load_weights(path, specs, reader=reader)
        checked = open_checkpoint(path, specs)
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader)
    finally:
        reader.close()
    assert torch.equal(loaded.tensors["a"], a.float()) and torch.equal(loaded.tensors["b"], b.half())
