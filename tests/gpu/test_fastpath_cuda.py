"""The fast weight path on a CUDA device through the pinned ring and through whatever ``auto`` picks here (KvikIO
when it imports and works, else the pinned ring): side stream, cast and NaN check on the device. KvikIO's own
cases: tests/gpu/test_kvikio_cuda.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.errors import CheckpointError, ValidationError
from serving.specs import WeightSpec
from serving.weights.fastpath import FastPathConfig, FastReader, allocate, read_checkpoint_into, tensor_sources
from serving.weights.loader import load_weights, open_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL = FastPathConfig(threads=4, buffers=2, buffer_bytes=1 << 20, read_bytes=4096, transfer="pinned")
CONFIGS = {"small": SMALL, "pinned": FastPathConfig(transfer="pinned"), "auto": FastPathConfig(transfer="auto")}


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(700, 1001, generator=g),  # 2.8 MB: several chunks of the small config
        "b.flag": torch.tensor([True, False, True]),
        "c.half": torch.randn(100_001, generator=g).half(),
        "d.bf16": torch.randn(333, 3, generator=g).bfloat16(),
        "e.long": torch.arange(5, dtype=torch.int64),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.empty(0, 4),
        "h.double": torch.randn(2, 9, generator=g, dtype=torch.float64),
    }


def specs_of(sd: dict[str, torch.Tensor]) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.fixture(params=list(CONFIGS))
def reader(request: pytest.FixtureRequest) -> Iterator[FastReader]:
    r = FastReader(CONFIGS[request.param])
    yield r
    r.close()


def test_same_tensors_as_load_file_on_the_device(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    loaded = load_weights(path, specs_of(sd), device="cuda", reader=reader)
    want = load_file(str(path))
    for k, v in want.items():
        got = loaded.tensors[k]
        assert got.is_cuda and got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got.cpu(), v), k
    assert loaded.stats is not None and loaded.stats.device.startswith("cuda")
    (choice,) = reader.choices.values()
    assert loaded.stats.transfer == choice.kind
    assert choice.kind == "pinned" if reader.config.transfer == "pinned" else choice.kind in ("kvikio", "pinned")


def test_sharded_and_reused_destinations(tmp_path: Path, reader: FastReader) -> None:
    specs = specs_of(mixed_state())
    dest = allocate(specs, "cuda")
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    for seed in (1, 2):
        sd = mixed_state(seed)
        names = list(sd)
        directory = tmp_path / f"v{seed}"
        directory.mkdir()
        import json

        weight_map = {}
        for i, part in enumerate((names[:4], names[4:])):
            save_file({n: sd[n] for n in part}, str(directory / f"s{i}.safetensors"))
            weight_map.update(dict.fromkeys(part, f"s{i}.safetensors"))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        loaded = load_weights(directory, specs, out=dest, reader=reader)
        assert {k: v.data_ptr() for k, v in loaded.tensors.items()} == ptrs
        assert all(torch.equal(dest[k].cpu(), sd[k]) for k in sd)


def test_cast_happens_on_the_device_and_matches_the_host_cast(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    specs["a.weight"] = WeightSpec("a.weight", (700, 1001), torch.bfloat16)
    specs["c.half"] = WeightSpec("c.half", (100_001,), torch.float32)
    fast = load_weights(path, specs, device="cuda", reader=reader)
    host = load_weights(path, specs)
    assert fast.stats is not None and set(fast.stats.cast) == {"a.weight", "c.half"}
    for k in specs:
        assert torch.equal(fast.tensors[k].cpu(), host.tensors[k]), k


def test_nan_and_overflow_are_found_on_the_device(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    sd["a.weight"][600, 1000] = float("nan")
    sd["c.half"][5] = float("inf")
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValidationError) as e:
        load_weights(path, specs_of(sd), device="cuda", reader=reader)
    assert len(e.value.problems) == 2 and "first at index (600, 1000)" in e.value.problems[0]
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.full((10,), 1e6)}, str(big))
    with pytest.raises(ValidationError, match="overflow"):
        load_weights(big, {"w": WeightSpec("w", (10,), torch.float16)}, device="cuda", reader=reader)


def test_scan_on_the_device(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    sd["d.bf16"][3, 1] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    with pytest.raises(ValidationError, match="'d.bf16'"):
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader,
                             device="cuda")


def test_truncated_file_fails_cleanly_and_the_reader_recovers(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    sources = tensor_sources(checked.metas, checked.needed)
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="shorter than its header claims"):
        reader.read_into(sources, specs, allocate(specs, "cuda"))
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    loaded = load_weights(good, specs, device="cuda", reader=reader)
    assert torch.equal(loaded.tensors["a.weight"].cpu(), sd["a.weight"])


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_coordinator_on_a_cuda_eager_engine(tmp_path: Path, strategy: str) -> None:
    from serving.engines import build_engine
    from serving.examples import TRANSFORMER, example_build_spec
    from serving.factory import build_module
    from serving.refit import RefitCoordinator
    from serving.weights.random_state import random_state_dict

    spec = example_build_spec(TRANSFORMER, device="cuda")
    coord = RefitCoordinator(build_engine("eager", spec), strategy=strategy)
    assert coord.fast_path
    x = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    try:
        outs = {}
        for seed in (1, 2, 3):
            sd = random_state_dict(build_module(TRANSFORMER), seed)
            path = tmp_path / f"v{seed}.safetensors"
            save_file(sd, str(path))
            report = coord.refit_from_path(path)
            assert report.outcome == "success", report.message
            module = build_module(TRANSFORMER).cuda()
            module.load_state_dict(sd)
            with torch.inference_mode():
                outs[seed] = module(x.cuda()).cpu()
            torch.testing.assert_close(coord.infer([x])[0].cpu(), outs[seed])
        assert coord.rollback().outcome == "success"
        torch.testing.assert_close(coord.infer([x])[0].cpu(), outs[2])
    finally:
        coord.close()
