"""Registered transfers: the window plan (pure), the mapping, and how the reader reports it cannot register.

The DMA itself needs CUDA: tests/gpu/test_fastpath_cuda.py runs every fast-path test through it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from serving.choices import TRANSFERS
from serving.errors import ConfigError
from serving.weights.fastpath import FastPathConfig, FastReader, TensorSource
from serving.weights.registered import HostRegistry, MappedFile, plan_windows

PAGE = 4096


def src(name: str, offset: int, nbytes: int, file: str = "a") -> TensorSource:
    return TensorSource(name, file, offset, nbytes, torch.uint8, (nbytes,))


def covered(windows: list, sources: list[TensorSource]) -> dict[str, list[tuple[int, int]]]:
    """name -> the file byte ranges its pieces copy, in order."""
    out: dict[str, list[tuple[int, int]]] = {}
    for w in windows:
        for p in w.pieces:
            start = w.offset + p.chunk_offset
            out.setdefault(p.name, []).append((start, start + p.nbytes))
    return out


def test_windows_are_page_aligned_disjoint_and_cover_every_byte_once() -> None:
    sources = [src("h", 80, 100), src("big", 180, 10 * PAGE + 7), src("tail", 180 + 10 * PAGE + 7, 5),
               src("far", 50 * PAGE + 3, 2 * PAGE), src("other", 8, 3 * PAGE, file="b"), src("empty", 400, 0)]
    windows = plan_windows(sources, 4 * PAGE, page=PAGE)
    for w in windows:
        assert w.offset % PAGE == 0 and w.nbytes % PAGE == 0 and 0 < w.nbytes <= 4 * PAGE
    for file in ("a", "b"):
        spans = sorted((w.offset, w.offset + w.nbytes) for w in windows if w.file == file)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # no page twice
    got = covered(windows, sources)
    for s in sources:
        if s.nbytes == 0:
            assert s.name not in got
            continue
        ranges = got[s.name]
        assert ranges[0][0] == s.offset and ranges[-1][1] == s.offset + s.nbytes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, no overlap
    # tensor offsets of the pieces follow the bytes
    big = [p for w in windows for p in w.pieces if p.name == "big"]
    assert [p.tensor_offset for p in big] == [0] + [sum(q.nbytes for q in big[:i]) for i in range(1, len(big))]
    # the gap between 'tail' and 'far' is more than a page: 'far' starts a window of its own
    assert any(w.offset == 50 * PAGE for w in windows)


def test_tensors_closer_than_a_page_share_a_window() -> None:
    windows = plan_windows([src("x", 0, 100), src("y", PAGE + 50, 10)], 64 * PAGE, page=PAGE)
    assert len(windows) == 1 and windows[0].nbytes == 2 * PAGE


def test_window_size_must_be_whole_pages() -> None:
    with pytest.raises(ValueError, match="multiple of the page size"):
        plan_windows([src("x", 0, 10)], PAGE + 1, page=PAGE)


def test_config_rejects_unknown_transfer_and_bad_windows() -> None:
    assert TRANSFERS == ("pinned", "registered") and FastPathConfig().transfer == "pinned"
    with pytest.raises(ConfigError, match="transfer='dma'.*window_bytes=1000.*windows_ahead=0"):
        FastPathConfig(transfer="dma", window_bytes=1000, windows_ahead=0)


def test_mapping_reads_the_file_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * PAGE + 5)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = MappedFile(fd)
        assert m.size == len(data) and m.address and m.bytes is not None
        assert bytes(m.bytes[PAGE:PAGE + 9].tolist()) == data[PAGE:PAGE + 9]
        m.close()
        assert m.map is None and m.bytes is None
    finally:
        os.close(fd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA runtime")
def test_without_a_cuda_runtime_there_is_no_registry_and_the_reason_is_given() -> None:
    registry, why = HostRegistry.get()
    assert registry is None and "libcudart" in why


def test_registered_without_a_cuda_runtime_fails_naming_the_fix(tmp_path: Path) -> None:
    if HostRegistry.get()[0] is not None:
        pytest.skip("this machine has a CUDA runtime")
    from safetensors.torch import save_file

    from serving.specs import WeightSpec
    from serving.weights.fastpath import tensor_sources
    from serving.weights.loader import open_checkpoint

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    specs = {"w": WeightSpec("w", (4,), torch.float32)}
    checked = open_checkpoint(path, specs)
    reader = FastReader(FastPathConfig(transfer="registered"))
    try:  # the CUDA side is never reached: the reader asks for the runtime first (a meta tensor stands in)
        dest = {"w": torch.empty(4, device="meta")}
        with pytest.raises(ConfigError, match="'registered': the CUDA runtime cannot be called.*'pinned'"):
            reader._run_device(tensor_sources(checked.metas, checked.needed),
                               {"w": _target(checked, dest)}, {}, torch.device("cuda", 0), str(path))
    finally:
        reader.close()


def _target(checked: object, dest: dict[str, torch.Tensor]) -> object:
    from serving.weights.fastpath import _Target, tensor_sources

    src = tensor_sources(checked.metas, checked.needed)[0]  # type: ignore[attr-defined]
    return _Target(0, src, torch.float32, dest["w"], True)


def test_a_file_that_cannot_be_registered_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    reader = FastReader(FastPathConfig(transfer="registered"))
    with caplog.at_level(logging.WARNING, logger="serving.weights.fastpath"):
        reader._not_registered("because")
        reader._not_registered("because")
    said = [r.getMessage() for r in caplog.records if "pinned buffers, not registered" in r.getMessage()]
    assert said == ["weights transfer: through pinned buffers, not registered page cache: because"]
