"""The fast weight path on the CPU: safetensors bytes straight into destination tensors, read by our threads or by
KvikIO (a fake of the library here; tests/gpu/test_kvikio_cuda.py runs the real one)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serving.errors import CheckpointError, ConfigError, ValidationError
from serving.specs import WeightSpec
from serving.weights.checkpoint import CheckpointPolicy
from serving.weights.fastpath import FastPathConfig, FastReader, allocate, read_checkpoint_into, tensor_sources
from serving.weights.loader import load_weights, open_checkpoint, read_checked
from serving.weights.validate import ValidationPolicy

from .fake_kvikio import FakeKvikIO
from .helpers import NUM_BATCHES, save, save_sharded, specs_of, tiny_state_dict

# tiny pieces, so that even these small tensors are cut across chunks and read by several threads
SMALL = FastPathConfig(threads=4, buffers=2, buffer_bytes=1 << 20, read_bytes=4096)
SMALL_KVIKIO = FastPathConfig(threads=4, buffers=2, buffer_bytes=1 << 20, task_bytes=4096, transfer="kvikio")


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd sizes and dtypes side by side: byte offsets that are not multiples of the element size."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(300, 77, generator=g),  # 92 400 bytes: several 4 KiB reads
        "b.flag": torch.tensor([True, False, True]),  # 3 bytes: misaligns what follows
        "c.half": torch.randn(1001, generator=g).half(),
        "d.bf16": torch.randn(33, 3, generator=g).bfloat16(),
        "e.long": torch.arange(5, dtype=torch.int64),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.empty(0, 4),
        "h.double": torch.randn(2, 9, generator=g, dtype=torch.float64),
    }


def make_reader(kind: str, fake: FakeKvikIO) -> FastReader:
    if kind == "kvikio":
        return FastReader(SMALL_KVIKIO, kvikio_loader=lambda: (fake, "imported"))
    return FastReader(SMALL)


@pytest.fixture(params=["threads", "kvikio"])
def reader(request: pytest.FixtureRequest) -> Iterator[FastReader]:
    """Our reader threads, and KvikIO's (the fake), each through the whole fast path."""
    fake = FakeKvikIO()
    r = make_reader(request.param, fake)
    yield r
    r.close()
    assert fake.live_threads() == 0  # closing the reader stopped the threads KvikIO ran for it


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_single_file_gives_the_same_tensors_as_safetensors_load_file(tmp_path: Path, reader: FastReader) -> None:
    path = save(tmp_path / "m.safetensors", mixed_state())
    loaded = load_weights(path, specs_of(mixed_state(), skip=()), reader=reader)
    assert_same(dict(loaded.tensors), load_file(str(path)))
    assert loaded.stats is not None and loaded.stats.bytes == sum(t.nbytes for t in mixed_state().values())
    assert loaded.stats.device == "cpu"
    assert loaded.stats.transfer == ("kvikio" if reader.config.transfer == "kvikio" else "cpu")


def test_sharded_checkpoint(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    names = list(state)
    shards = {"s1.safetensors": {n: state[n] for n in names[:3]},
              "s2.safetensors": {n: state[n] for n in names[3:]}}
    directory = save_sharded(tmp_path / "ck", shards)
    loaded = load_weights(directory, specs_of(state, skip=()), device="cpu", reader=reader)
    assert loaded.format == "sharded"
    assert_same(dict(loaded.tensors), state)


def test_cast_to_the_engine_dtype_matches_the_host_path(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    path = save(tmp_path / "m.safetensors", state)
    specs = specs_of(state, skip=())
    specs["a.weight"] = WeightSpec("a.weight", (300, 77), torch.bfloat16)  # float32 -> bfloat16
    specs["c.half"] = WeightSpec("c.half", (1001,), torch.float32)  # float16 -> float32
    fast = load_weights(path, specs, reader=reader)
    host = load_weights(path, specs)
    assert fast.tensors["a.weight"].dtype == torch.bfloat16 and fast.stats is not None
    assert set(fast.stats.cast) == {"a.weight", "c.half"}
    assert_same(dict(fast.tensors), dict(host.tensors))


def test_destination_tensors_are_filled_in_place_and_reused(tmp_path: Path, reader: FastReader) -> None:
    sd = tiny_state_dict(0)
    specs = specs_of(sd)
    dest = allocate(specs, "cpu")
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    for seed in (1, 2):
        path = save(tmp_path / f"v{seed}.safetensors", tiny_state_dict(seed))
        loaded = load_weights(path, specs, out=dest, reader=reader,
                              validation=ValidationPolicy(unexpected="error"), ignored=[NUM_BATCHES])
        assert all(loaded.tensors[k] is dest[k] for k in specs)
        assert {k: v.data_ptr() for k, v in dest.items()} == ptrs
        want = tiny_state_dict(seed)
        assert all(torch.equal(dest[k], want[k]) for k in specs)


def test_destination_may_be_a_function_called_only_when_the_metadata_fits(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    specs = specs_of(sd)
    calls: list[int] = []

    def out() -> dict[str, torch.Tensor]:
        calls.append(1)
        return allocate(specs, "cpu")

    bad = save(tmp_path / "bad.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(ValidationError):
        load_weights(bad, specs, out=out)
    assert calls == []
    good = save(tmp_path / "good.safetensors", sd)
    load_weights(good, specs, out=out, ignored=[NUM_BATCHES])
    assert calls == [1]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_is_found_and_named(tmp_path: Path, reader: FastReader, value: float) -> None:
    state = mixed_state()
    state["a.weight"][123, 5] = value
    state["h.double"][1, 1] = value
    path = save(tmp_path / "m.safetensors", state)
    with pytest.raises(ValidationError) as e:
        load_weights(path, specs_of(state, skip=()), reader=reader)
    assert len(e.value.problems) == 2
    assert "'a.weight'" in e.value.problems[0] and "first at index (123, 5)" in e.value.problems[0]
    assert "'h.double'" in e.value.problems[1]


def test_large_finite_values_whose_sum_overflows_are_accepted_and_one_inf_among_them_is_not(
        tmp_path: Path, reader: FastReader) -> None:
    """The CPU check sums each piece; a sum that overflows must fall back to looking at every element."""
    state = {"big32": torch.full((3000,), 3e38), "big16": torch.full((3000,), 6e4, dtype=torch.float16)}
    assert not torch.isfinite(state["big32"].sum()) and not torch.isfinite(state["big16"].sum())
    specs = specs_of(state, skip=())
    loaded = load_weights(save(tmp_path / "big.safetensors", state), specs, reader=reader)
    assert_same(dict(loaded.tensors), state)
    state["big16"][2999] = float("-inf")
    with pytest.raises(ValidationError) as e:
        load_weights(save(tmp_path / "inf.safetensors", state), specs, reader=reader)
    assert len(e.value.problems) == 1
    assert "'big16'" in e.value.problems[0] and "first at index (2999,)" in e.value.problems[0]


def test_nan_check_can_be_turned_off(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    state["a.weight"][0, 0] = float("nan")
    path = save(tmp_path / "m.safetensors", state)
    loaded = load_weights(path, specs_of(state, skip=()), reader=reader,
                          validation=ValidationPolicy(check_finite=False))
    assert torch.isnan(loaded.tensors["a.weight"][0, 0])


def test_cast_overflow_is_refused(tmp_path: Path, reader: FastReader) -> None:
    state = {"w": torch.full((10,), 1e6)}
    path = save(tmp_path / "m.safetensors", state)
    with pytest.raises(ValidationError, match="overflow to Inf when cast from float32 to float16"):
        load_weights(path, {"w": WeightSpec("w", (10,), torch.float16)}, reader=reader)


def test_scan_checks_without_keeping(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    path = save(tmp_path / "ok.safetensors", state)
    specs = specs_of(state, skip=())
    checked = open_checkpoint(path, specs)
    stats = read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader)
    assert stats.bytes > 0
    state["d.bf16"][0, 0] = float("inf")
    bad = save(tmp_path / "bad.safetensors", state)
    checked = open_checkpoint(bad, specs)
    with pytest.raises(ValidationError, match="'d.bf16'"):
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader)


def test_a_file_shorter_than_its_header_claims_fails_cleanly(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    path = save(tmp_path / "m.safetensors", state)
    specs = specs_of(state, skip=())
    checked = open_checkpoint(path, specs)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(CheckpointError) as e:  # the fingerprint no longer matches
        read_checked(checked, reader=reader)
    assert e.value.reason == "changed_during_read"
    # the same with the fingerprint check out of the way: the reads themselves come up short
    sources = tensor_sources(checked.metas, checked.needed)
    cut = min((s for s in sources if s.offset + s.nbytes > size - 100), key=lambda s: s.offset)
    with pytest.raises(CheckpointError, match=rf"m.safetensors: the file ends at byte {size - 100} but its header "
                       rf"places tensor '{cut.name}' up to byte {cut.offset + cut.nbytes}: the file is shorter than "
                       "its header claims") as e2:
        reader.read_into(sources, specs, allocate(specs, "cpu"), source=str(path))
    assert e2.value.reason == "corrupt"
    # and through the public entry: the header check refuses it before any data is read
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(path, specs, reader=reader)
    # the reader still works afterwards
    good = save(tmp_path / "good.safetensors", state)
    assert_same(dict(load_weights(good, specs, reader=reader).tensors), state)


def test_destinations_that_do_not_fit_are_refused(tmp_path: Path, reader: FastReader) -> None:
    state = mixed_state()
    path = save(tmp_path / "m.safetensors", state)
    specs = specs_of(state, skip=())
    dest = allocate(specs, "cpu")
    dest["a.weight"] = torch.empty(77, 300).t()  # right shape, not contiguous
    dest["c.half"] = torch.empty(1001)  # wrong dtype
    with pytest.raises(ConfigError, match="not contiguous.*c.half|c.half.*not contiguous"):
        load_weights(path, specs, out=dest, reader=reader)


def test_torch_pickles_are_copied_into_the_destinations(tmp_path: Path) -> None:
    sd = tiny_state_dict(3)
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    specs = specs_of(sd)
    dest = allocate(specs, "cpu")
    loaded = load_weights(path, specs, out=dest, policy=CheckpointPolicy(allow_pickle=True), ignored=[NUM_BATCHES])
    assert all(loaded.tensors[k] is dest[k] and torch.equal(dest[k], sd[k]) for k in specs)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="buffers=1"):
        FastPathConfig(buffers=1)
