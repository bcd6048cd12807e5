"""The fast path's plans (pure): chunks for our threads, steps for KvikIO, and the short-file errors."""

from __future__ import annotations

import pytest
import torch

from serving.errors import ConfigError
from serving.weights.plan import TensorSource, past_end, plan_chunks, plan_steps, short_file_error, short_in


def src(name: str, offset: int, nbytes: int, dtype: torch.dtype = torch.float32, file: str = "f") -> TensorSource:
    return TensorSource(name, file, offset, nbytes, dtype, (nbytes // dtype.itemsize,))


def test_plan_packs_neighbours_splits_large_tensors_on_elements_and_breaks_at_gaps() -> None:
    chunks = plan_chunks([src("a", 10, 8), src("b", 18, 30, torch.float16), src("c", 100, 40), src("z", 0, 0)],
                         chunk_bytes=32)
    assert [(c.offset, c.nbytes) for c in chunks] == [(10, 32), (42, 6), (100, 32), (132, 8)]
    assert [(p.name, p.tensor_offset, p.chunk_offset, p.nbytes) for p in chunks[0].pieces] == [
        ("a", 0, 0, 8), ("b", 0, 8, 24)]
    assert [(p.name, p.tensor_offset, p.nbytes) for c in chunks[1:] for p in c.pieces] == [
        ("b", 24, 6), ("c", 0, 32), ("c", 32, 8)]
    # every byte of every tensor exactly once
    for name, size in (("a", 8), ("b", 30), ("c", 40)):
        spans = sorted((p.tensor_offset, p.nbytes) for c in chunks for p in c.pieces if p.name == name)
        assert sum(n for _, n in spans) == size and spans[0][0] == 0


def test_plan_cuts_only_on_element_boundaries() -> None:
    chunks = plan_chunks([src("x", 0, 3), src("d", 3, 80, torch.float64)], chunk_bytes=32)
    for c in chunks:
        assert c.nbytes <= 32
        for p in c.pieces:
            if p.name == "d":
                assert p.tensor_offset % 8 == 0 and p.nbytes % 8 == 0


def test_steps_read_direct_tensors_whole_and_the_rest_through_alternating_slots() -> None:
    sources = [src("big", 100, 1000), src("cast1", 1100, 40), src("cast2", 1140, 100, torch.float16),
               src("small", 1240, 4), src("empty", 1244, 0), src("other", 8, 64, file="g")]
    steps = plan_steps(sources, staged={"cast1", "cast2", "other"}, chunk_bytes=64)
    assert [(s.file, s.offset, s.nbytes, s.direct) for s in steps] == [
        ("f", 100, 1000, True),  # one read straight into the destination, however large
        ("f", 1100, 64, False), ("f", 1164, 64, False), ("f", 1228, 12, False),  # cast1 + cast2, chunked
        ("f", 1240, 4, True),
        ("g", 8, 64, False),
    ]
    assert [s.slot for s in steps if not s.direct] == [0, 1, 0, 1]  # a slot is refilled every other chunk
    assert all(s.slot == -1 for s in steps if s.direct)
    assert steps[0].pieces[0].name == "big" and steps[0].first == "big"
    # every byte of every staged tensor exactly once, within the chunk size; nothing for an empty tensor
    for name, size in (("cast1", 40), ("cast2", 100), ("other", 64)):
        spans = sorted((p.tensor_offset, p.nbytes) for s in steps for p in s.pieces if p.name == name)
        assert sum(n for _, n in spans) == size and spans[0][0] == 0
    assert all(s.nbytes <= 64 for s in steps if not s.direct)
    assert not any(p.name == "empty" for s in steps for p in s.pieces)


def test_steps_need_a_slot() -> None:
    with pytest.raises(ConfigError, match="slots=0"):
        plan_steps([src("a", 0, 4)], {"a"}, 64, slots=0)


def test_short_file_errors_name_the_file_and_the_first_tensor_not_read() -> None:
    e = short_file_error("/w/m.safetensors", 100, "w", 140)
    assert e.reason == "corrupt" and "/w/m.safetensors: the file ends at byte 100" in str(e)
    assert "tensor 'w' up to byte 140" in str(e) and "rename them into place" in str(e)
    sources = [src("a", 8, 40), src("b", 48, 40), src("c", 88, 40), src("d", 0, 8, file="g")]
    err = past_end(sources, {"f": 70, "g": 8})
    assert err is not None and "ends at byte 70" in str(err) and "tensor 'b' up to byte 88" in str(err)
    assert past_end(sources, {"f": 128, "g": 8}) is None
    steps = plan_steps(sources, {"a", "b", "c"}, 1000)
    step = next(s for s in steps if s.file == "f")
    err = short_in(step.pieces, step.file, step.offset, 100)  # read stopped at byte 100: 'c' is cut
    assert "ends at byte 100" in str(err) and "tensor 'c' up to byte 128" in str(err)
