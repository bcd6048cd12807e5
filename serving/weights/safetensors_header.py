"""Strict parsing of safetensors headers, without reading any tensor data.

A safetensors file is ``[u64 little-endian N][N bytes of UTF-8 JSON header][data section]``.
The header maps tensor names to ``{"dtype", "shape", "data_offsets": [start, end]}`` with offsets
relative to the data section, plus an optional ``"__metadata__"`` object of strings.

:func:`parse_header` checks everything the ``safetensors`` library checks (and reports every bad
tensor at once), so a truncated, padded, spliced or hostile file is refused before any data is
mapped: the data section must be covered exactly, without gaps, overlaps or trailing bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from serving.errors import CheckpointError, reading

#: the 8-byte little-endian header length that starts every safetensors file
HEADER_LEN_BYTES = 8
#: default cap on the JSON header (the safetensors library uses the same 100 MiB)
MAX_HEADER_BYTES = 100 << 20


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    dtypes: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    # Newer names, present only in newer torch builds. Sub-byte types (F4, F6_*) have no torch dtype.
    optional = {"U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E8M0": "float8_e8m0fnu",
                "C64": "complex64"}
    for st_name, torch_name in optional.items():
        dt = getattr(torch, torch_name, None)
        if isinstance(dt, torch.dtype):
            dtypes[st_name] = dt
    return dtypes


#: safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = _safetensors_dtypes()


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a checkpoint file, and what it is.

    ``start``/``end`` are byte offsets into the data section of a safetensors file (for a torch
    pickle, ``0`` and the tensor's byte size: pickles have no offsets to report).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _corrupt(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: not a valid safetensors file: {what}", reason="corrupt")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, entry: object, source: str, data_size: int) -> TensorMeta | str:
    """One header entry -> its metadata, or a problem message naming the tensor."""
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        return f"{where}: entry is {type(entry).__name__}, expected an object"
    dtype_name = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype_name, str):
        return f"{where}: missing or non-string 'dtype'"
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        return f"{where}: unknown dtype {dtype_name!r} (known: {', '.join(sorted(SAFETENSORS_DTYPES))})"
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return f"{where}: 'shape' must be a list of non-negative integers, found {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"{where}: 'data_offsets' must be [start, end] with 0 <= start <= end, found {offsets!r}"
    start, end = int(offsets[0]), int(offsets[1])
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if end - start != expected:
        return (f"{where}: data_offsets [{start}, {end}] span {end - start} bytes, but shape "
                f"{tuple(shape)} of {dtype_name} needs {expected}")
    if end > data_size:
        return (f"{where}: data_offsets [{start}, {end}] go beyond the end of the file "
                f"(data section is {data_size} bytes: truncated?)")
    return TensorMeta(name, dtype, tuple(int(d) for d in shape), start, end, source)


def parse_header(prefix: bytes, file_size: int, source: str, *,
                 max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorMeta]:
    """Parse and check a safetensors header.

    ``prefix`` holds (at least) the first ``8 + N`` bytes of the file, ``file_size`` its full size and
    ``source`` the name used in messages (and recorded in :attr:`TensorMeta.file`). Any violation raises
    :class:`CheckpointError` with ``reason="corrupt"``; problems with individual tensors are collected
    and reported together.
    """
    if len(prefix) < HEADER_LEN_BYTES:
        raise _corrupt(source, f"only {len(prefix)} byte(s), shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:HEADER_LEN_BYTES])
    if n == 0:
        raise _corrupt(source, "header length is 0")
    if n > max_header_bytes:
        raise _corrupt(source, f"header length {n} exceeds the cap of {max_header_bytes} bytes")
    if HEADER_LEN_BYTES + n > file_size:
        raise _corrupt(source, f"header length {n} is larger than the file ({file_size} bytes): "
                               f"truncated, or not a safetensors file")
    if len(prefix) < HEADER_LEN_BYTES + n:
        raise _corrupt(source, f"header truncated: {len(prefix) - HEADER_LEN_BYTES} of {n} bytes")
    raw = prefix[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n]
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(source, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(source, f"header is a JSON {type(header).__name__}, expected an object")

    data_size = file_size - HEADER_LEN_BYTES - n
    problems: list[str] = []
    metas: dict[str, TensorMeta] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                problems.append("'__metadata__' must be an object of strings")
            continue
        parsed = _parse_entry(name, entry, source, data_size)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            metas[name] = parsed
    if problems:
        raise _corrupt(source, "; ".join(problems))

    # The data section must be covered exactly once: no overlap, no gap, no trailing bytes.
    pos = 0
    prev: TensorMeta | None = None
    for meta in sorted(metas.values(), key=lambda m: (m.start, m.end)):
        if meta.start < pos:
            assert prev is not None
            problems.append(f"tensor {meta.name!r}: data_offsets [{meta.start}, {meta.end}] overlap "
                            f"tensor {prev.name!r} [{prev.start}, {prev.end}]")
        elif meta.start > pos:
            problems.append(f"tensor {meta.name!r}: {meta.start - pos} unaccounted byte(s) before its "
                            f"data_offsets [{meta.start}, {meta.end}]")
        pos = max(pos, meta.end)
        prev = meta
    if pos != data_size and not problems:
        problems.append(f"{data_size - pos} trailing byte(s) after the last tensor (data section is "
                        f"{data_size} bytes, tensors cover {pos}): the header does not describe the file")
    if problems:
        raise _corrupt(source, "; ".join(problems))
    return metas


def read_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorMeta]:
    """Read and check the header of a safetensors file; reads only the header bytes."""
    source = str(path)
    with reading(source, gone="no such file", gone_reason="not_found"), open(path, "rb") as f:
        return read_open_header(f, source, max_header_bytes=max_header_bytes)[0]


def read_open_header(f: BinaryIO, source: str, *,
                     max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, TensorMeta], int]:
    """The checked header of the safetensors file open as ``f`` (read from its start), and where its data
    section starts: :attr:`TensorMeta.start` and ``end`` are relative to that offset."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    first = f.read(HEADER_LEN_BYTES)
    if len(first) == HEADER_LEN_BYTES:
        (n,) = struct.unpack("<Q", first)
        # read the JSON only when its length is sane; parse_header reports why otherwise
        if 0 < n <= max_header_bytes and HEADER_LEN_BYTES + n <= size:
            first += f.read(n)
    metas = parse_header(first, size, source, max_header_bytes=max_header_bytes)
    return metas, len(first)
