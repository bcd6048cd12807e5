"""``weights_transfer: kvikio`` on a CUDA device, against the real KvikIO: exact bytes, casts and NaN checks on the
device, the short-file and changed-file errors, the bounded scratch of the in-place prescan, refits through the
coordinator. Skips, saying why, where CUDA or KvikIO is missing (``bash bench/gpu_wheels.sh kvikio`` fetches it)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.errors import CheckpointError, ValidationError
from serving.specs import WeightSpec
from serving.weights.fastpath import FastPathConfig, FastReader, allocate, read_checkpoint_into, tensor_sources
from serving.weights.kvikio_reader import SLOTS, load_kvikio
from serving.weights.loader import load_weights, open_checkpoint

KVIKIO, WHY = load_kvikio() if torch.cuda.is_available() else (None, "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and KVIKIO is None, reason=f"needs KvikIO: {WHY}"),
]

#: 64 KiB tasks and 1 MiB scratch chunks: the 2.8 MB tensor is several tasks, a cast spans several chunks
SMALL = FastPathConfig(threads=4, buffer_bytes=1 << 20, task_bytes=64 << 10, transfer="kvikio")
CONFIGS = {"small": SMALL, "default": FastPathConfig(transfer="kvikio")}


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(700, 1001, generator=g),  # 2.8 MB
        "b.flag": torch.tensor([True, False, True]),  # 3 bytes: what follows is not aligned
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


def proxy(cufile: type) -> Any:
    """The real kvikio module with its CuFile replaced (to change a file between or during reads)."""
    assert KVIKIO is not None

    class Module:
        CuFile = cufile
        defaults = KVIKIO.defaults
        __version__ = KVIKIO.__version__
        bounce_buffer_free = staticmethod(KVIKIO.bounce_buffer_free)
        cufile_driver = getattr(KVIKIO, "cufile_driver", None)

    return Module


def test_exact_bytes_and_the_log(tmp_path: Path, reader: FastReader, caplog: pytest.LogCaptureFixture) -> None:
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with caplog.at_level(logging.INFO, logger="serving.weights.fastpath"):
        loaded = load_weights(path, specs_of(sd), device="cuda", reader=reader)
    for k, v in load_file(str(path)).items():
        got = loaded.tensors[k]
        assert got.is_cuda and got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got.cpu(), v), k
    assert loaded.stats is not None and loaded.stats.transfer == "kvikio"
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("weights transfer")]
    assert f": kvikio (weights_transfer is 'kvikio'; KvikIO {KVIKIO.__version__}, GDS " in said, said
    print(said)  # whether GDS is used on this host


def test_shards_into_reused_destinations(tmp_path: Path, reader: FastReader) -> None:
    specs = specs_of(mixed_state())
    dest = allocate(specs, "cuda")
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    for seed in (1, 2):
        sd = mixed_state(seed)
        names = list(sd)
        directory = tmp_path / f"v{seed}"
        directory.mkdir()
        weight_map = {}
        for i, part in enumerate((names[:4], names[4:])):
            save_file({n: sd[n] for n in part}, str(directory / f"s{i}.safetensors"))
            weight_map.update(dict.fromkeys(part, f"s{i}.safetensors"))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        loaded = load_weights(directory, specs, out=dest, reader=reader)
        assert {k: v.data_ptr() for k, v in loaded.tensors.items()} == ptrs
        assert all(torch.equal(dest[k].cpu(), sd[k]) for k in sd)


def test_casts_on_the_device_match_the_host_cast(tmp_path: Path, reader: FastReader) -> None:
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


def test_nan_and_overflow_are_refused_naming_the_tensor(tmp_path: Path, reader: FastReader) -> None:
    sd = mixed_state()
    sd["a.weight"][600, 1000] = float("nan")  # read straight into its destination
    sd["c.half"][5] = float("inf")
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValidationError) as e:
        load_weights(path, specs_of(sd), device="cuda", reader=reader)
    assert len(e.value.problems) == 2
    assert "'a.weight'" in e.value.problems[0] and "first at index (600, 1000)" in e.value.problems[0]
    assert "'c.half'" in e.value.problems[1]
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.full((10,), 1e6)}, str(big))  # read through the scratch and cast: overflows
    with pytest.raises(ValidationError, match="'w'.*overflow"):
        load_weights(big, {"w": WeightSpec("w", (10,), torch.float16)}, device="cuda", reader=reader)


def test_a_truncated_file_gives_the_short_file_error_and_the_reader_recovers(tmp_path: Path,
                                                                              reader: FastReader) -> None:
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    sources = tensor_sources(checked.metas, checked.needed)
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    with pytest.raises(CheckpointError, match="shorter than its header claims") as e:
        reader.read_into(sources, specs, allocate(specs, "cuda"), source=str(path))
    assert e.value.reason == "corrupt" and f"the file ends at byte {size - 1000}" in str(e.value)
    with pytest.raises(CheckpointError) as e2:  # through the public entry: the fingerprint no longer matches
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, allocate(specs, "cuda"),
                             reader=reader)
    assert e2.value.reason == "changed_during_read"
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    loaded = load_weights(good, specs, device="cuda", reader=reader)
    assert torch.equal(loaded.tensors["a.weight"].cpu(), sd["a.weight"])


def test_a_file_cut_during_the_read_names_the_tensor(tmp_path: Path) -> None:
    """KvikIO's own EOF error, mapped to the fast path's short-file error."""
    assert KVIKIO is not None
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    sources = tensor_sources(open_checkpoint(path, specs).metas, list(specs))
    a = next(s for s in sources if s.name == "a.weight")
    cut = a.offset + a.nbytes // 2

    class Cutting(KVIKIO.CuFile):  # type: ignore[misc, name-defined]
        def pread(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> Any:
            if file_offset == a.offset:
                os.truncate(path, cut)
            return super().pread(buf, size, file_offset, task_size)

    reader = FastReader(SMALL, kvikio_loader=lambda: (proxy(Cutting), "imported"))
    try:
        with pytest.raises(CheckpointError) as e:
            reader.read_into(sources, specs, allocate(specs, "cuda"), source=str(path))
    finally:
        reader.close()
    assert e.value.reason == "corrupt"
    assert f"the file ends at byte {cut} but its header places tensor 'a.weight' up to byte {a.offset + a.nbytes}" \
        in str(e.value)


def test_a_file_changed_while_read_is_refused(tmp_path: Path) -> None:
    assert KVIKIO is not None
    sd = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = specs_of(sd)
    checked = open_checkpoint(path, specs)
    touched: list[int] = []

    class Touching(KVIKIO.CuFile):  # type: ignore[misc, name-defined]
        def pread(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> Any:
            if not touched and file_offset > 4096:  # not the probe: a writer rewrites the file meanwhile
                st = path.stat()
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
                touched.append(file_offset)
            return super().pread(buf, size, file_offset, task_size)

    reader = FastReader(SMALL, kvikio_loader=lambda: (proxy(Touching), "imported"))
    try:
        with pytest.raises(CheckpointError, match="changed while it was being read") as e:
            read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, allocate(specs, "cuda"),
                                 reader=reader)
    finally:
        reader.close()
    assert e.value.reason == "changed_during_read" and touched


def test_the_in_place_prescan_holds_a_bounded_scratch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(8 << 20, generator=g) for i in range(4)}  # 128 MB of float32
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    specs = {k: WeightSpec(k, tuple(v.shape), torch.float16) for k, v in sd.items()}  # a cast, too
    checked = open_checkpoint(path, specs)
    config = FastPathConfig(threads=8, buffer_bytes=4 << 20, transfer="kvikio")
    reader = FastReader(config)
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, None, reader=reader,
                             device="cuda")
        peak = torch.cuda.max_memory_allocated() - before
    finally:
        reader.close()
    model = sum(v.nbytes for v in sd.values())
    # the two scratch slots, plus one chunk's cast and finiteness temporaries at a time
    assert peak <= (SLOTS + 2) * config.buffer_bytes < model // 4, (peak, model)


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_refits_through_the_coordinator(tmp_path: Path, strategy: str, caplog: pytest.LogCaptureFixture) -> None:
    from serving.engines import build_engine
    from serving.examples import TRANSFORMER, example_build_spec
    from serving.factory import build_module
    from serving.refit import RefitCoordinator
    from serving.weights.random_state import random_state_dict

    spec = example_build_spec(TRANSFORMER, device="cuda")
    coord = RefitCoordinator(build_engine("eager", spec), strategy=strategy,
                             fast_path_config=FastPathConfig(transfer="kvikio"))
    assert coord.fast_path
    x = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    try:
        outs = {}
        with caplog.at_level(logging.INFO, logger="serving.weights.fastpath"):
            for seed in (1, 2):
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
        assert not torch.equal(outs[1], outs[2])
        assert any(": kvikio (" in r.getMessage() for r in caplog.records)
        assert coord.rollback().outcome == "success"
        torch.testing.assert_close(coord.infer([x])[0].cpu(), outs[1])
    finally:
        coord.close()
