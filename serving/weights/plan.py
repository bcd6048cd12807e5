"""Which bytes of which file go into which destination tensor: the fast path's plans. Pure, except
:func:`data_start` (8 bytes of a file).

Two readers carry a plan out (:mod:`serving.weights.fastpath` picks one):

* the pinned ring and the CPU threads read **chunks** (:func:`plan_chunks`): contiguous byte ranges of one
  file of at most one buffer, several small tensors to a chunk, a large tensor cut on element boundaries;
* KvikIO reads **steps** (:func:`plan_steps`): a tensor stored in its destination's dtype is one step read
  straight into the destination tensor; every other tensor (one to cast, or only to check) goes through a
  device scratch of a few slots, chunk by chunk, so the scratch is bounded by the chunk size, never by the
  model.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.errors import CheckpointError, ConfigError, reading
from serving.specs import WeightSpec, dtype_name
from serving.weights.safetensors_header import HEADER_LEN_BYTES, TensorMeta


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor's bytes are: a file and an absolute byte offset in it."""

    name: str
    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Part of a tensor inside a chunk: ``nbytes`` bytes from ``tensor_offset`` of the tensor,
    found at ``chunk_offset`` of the chunk."""

    name: str
    tensor_offset: int
    chunk_offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One contiguous byte range of one file, read in one go into one buffer."""

    file: str
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Step:
    """One KvikIO read: ``nbytes`` of ``file`` from ``offset``.

    ``direct``: the bytes of one tensor, read straight into its destination (``pieces`` is that whole
    tensor). Otherwise read into scratch ``slot``, from which ``pieces`` are cast or checked.
    """

    file: str
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]
    direct: bool
    slot: int = -1

    @property
    def first(self) -> str:
        """The tensor the step starts with (errors name it)."""
        return self.pieces[0].name


def plan_chunks(sources: Iterable[TensorSource], chunk_bytes: int) -> list[Chunk]:
    """Cut the tensors' byte ranges into chunks of at most ``chunk_bytes``.

    Tensors that follow each other in a file share a chunk; a tensor is cut only on element
    boundaries (so every piece can be viewed in its dtype); empty tensors have no piece.
    """
    chunks: list[Chunk] = []
    cur_file, cur_start, cur_end = "", 0, 0
    pieces: list[Piece] = []

    def flush() -> None:
        if pieces:
            chunks.append(Chunk(cur_file, cur_start, cur_end - cur_start, tuple(pieces)))
            pieces.clear()

    for src in sorted(sources, key=lambda s: (s.file, s.offset)):
        itemsize = src.dtype.itemsize
        if chunk_bytes < itemsize:
            raise ConfigError(f"chunk of {chunk_bytes} bytes cannot hold one {dtype_name(src.dtype)} element")
        pos = 0
        while pos < src.nbytes:
            at = src.offset + pos
            if not pieces or cur_file != src.file or cur_end != at or cur_end - cur_start >= chunk_bytes:
                flush()
                cur_file, cur_start, cur_end = src.file, at, at
            take = min(src.nbytes - pos, chunk_bytes - (cur_end - cur_start))
            if take < src.nbytes - pos:
                take -= take % itemsize
                if take == 0:  # not even one element fits: start a new chunk
                    flush()
                    continue
            pieces.append(Piece(src.name, pos, cur_end - cur_start, take))
            cur_end += take
            pos += take
    flush()
    return chunks


def plan_steps(sources: Iterable[TensorSource], staged: Collection[str], chunk_bytes: int,
               slots: int = 2) -> list[Step]:
    """KvikIO's reads, in file order: one step per tensor not in ``staged`` (straight into its destination),
    and the ``staged`` tensors in chunks of at most ``chunk_bytes`` through ``slots`` scratch slots, taken
    in turn. Empty tensors have no step."""
    if slots < 1:
        raise ConfigError(f"slots={slots} (need >= 1)")
    sources = list(sources)
    steps = [Step(s.file, s.offset, s.nbytes, (Piece(s.name, 0, 0, s.nbytes),), direct=True)
             for s in sources if s.name not in staged and s.nbytes]
    steps += [Step(c.file, c.offset, c.nbytes, c.pieces, direct=False)
              for c in plan_chunks([s for s in sources if s.name in staged], chunk_bytes)]
    steps.sort(key=lambda s: (s.file, s.offset))
    out, k = [], 0
    for s in steps:
        if not s.direct:
            s = Step(s.file, s.offset, s.nbytes, s.pieces, direct=False, slot=k % slots)
            k += 1
        out.append(s)
    return out


def data_start(file: str | Path) -> int:
    """Absolute offset of a safetensors file's data section (8 + the header length)."""
    with reading(file):
        fd = os.open(file, os.O_RDONLY)
        try:
            first = os.pread(fd, HEADER_LEN_BYTES, 0)
        finally:
            os.close(fd)
    if len(first) < HEADER_LEN_BYTES:
        raise CheckpointError(f"{file}: shorter than the 8-byte header length", reason="corrupt")
    return HEADER_LEN_BYTES + int(struct.unpack("<Q", first)[0])


def tensor_sources(metas: Mapping[str, TensorMeta], names: Iterable[str]) -> list[TensorSource]:
    """The byte ranges of ``names`` in their safetensors files (reads 8 bytes per file)."""
    starts: dict[str, int] = {}
    out = []
    for name in names:
        meta = metas[name]
        if meta.file not in starts:
            starts[meta.file] = data_start(meta.file)
        out.append(TensorSource(name, meta.file, starts[meta.file] + meta.start, meta.nbytes, meta.dtype,
                                meta.shape))
    return out


def allocate(specs: Mapping[str, WeightSpec], device: torch.device | str,
             names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Uninitialized destination tensors for ``specs`` on ``device``, in the specs' dtypes."""
    device = torch.device(device)
    keys = list(specs) if names is None else list(names)
    return {n: torch.empty(specs[n].shape, dtype=specs[n].dtype, device=device) for n in keys}


def destination_problems(specs: Mapping[str, WeightSpec], dest: Mapping[str, torch.Tensor],
                         names: Iterable[str]) -> list[str]:
    """What is wrong with destination tensors (missing, wrong shape/dtype, not contiguous, mixed devices,
    two names sharing memory)."""
    problems = []
    devices = set()
    seen: dict[int, str] = {}
    for name in names:
        t = dest.get(name)
        spec = specs[name]
        if t is None:
            problems.append(f"{name!r}: no destination tensor")
            continue
        devices.add(t.device)
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            problems.append(f"{name!r}: destination is {dtype_name(t.dtype)}{list(t.shape)}, the engine needs "
                            f"{dtype_name(spec.dtype)}{list(spec.shape)}")
        if not t.is_contiguous():
            problems.append(f"{name!r}: destination is not contiguous")
        if t.numel():
            key = t.data_ptr()
            if key in seen:
                problems.append(f"{name!r}: destination shares memory with {seen[key]!r}")
            seen[key] = name
    if len(devices) > 1:
        problems.append(f"destination tensors are on several devices: {sorted(map(str, devices))}")
    return problems


# --------------------------------------------------------------------------- errors (pure)


def short_file_error(file: str, size: int, name: str, end: int) -> CheckpointError:
    """A file that ends before a tensor its header places: truncated, or rewritten while being read."""
    return CheckpointError(
        f"{file}: the file ends at byte {size} but its header places tensor {name!r} up to byte {end}: the file "
        f"is shorter than its header claims (truncated, or rewritten while being read); write checkpoints "
        f"elsewhere and rename them into place", reason="corrupt")


def short_in(pieces: Iterable[Piece], file: str, base: int, got_to: int) -> CheckpointError:
    """The short-file error for a read of ``pieces`` (at ``base`` of ``file``) that stopped at byte ``got_to``
    of the file: it names the first tensor the read did not complete."""
    listed = list(pieces)
    piece = next((p for p in listed if base + p.chunk_offset + p.nbytes > got_to), listed[-1])
    return short_file_error(file, got_to, piece.name, base + piece.chunk_offset + piece.nbytes)


def past_end(sources: Iterable[TensorSource], sizes: Mapping[str, int]) -> CheckpointError | None:
    """The short-file error for the first tensor (in file order) that ends past its file's size, if any."""
    for s in sorted(sources, key=lambda s: (s.file, s.offset)):
        if s.offset + s.nbytes > sizes[s.file]:
            return short_file_error(s.file, sizes[s.file], s.name, s.offset + s.nbytes)
    return None
