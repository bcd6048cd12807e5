"""Reading tensors out of a safetensors file through one open descriptor, never through a memory mapping.

A mapping of a file that is truncated while it is read faults the process (SIGBUS): in Triton that kills
the model instance's stub. Reading with ``preadv`` into fresh tensors turns a truncation into a short read
(:class:`~serving.errors.CheckpointError`, ``changed_during_read``) and a deletion or rename into nothing at
all (the descriptor keeps the inode it opened; :mod:`serving.weights.checkpoint` checks the path after the
read). The header is parsed strictly (:func:`~serving.weights.safetensors_header.parse_header`) from the
same descriptor the data is read from.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import torch

from serving.errors import CheckpointError
from serving.weights.safetensors_header import HEADER_LEN_BYTES, MAX_HEADER_BYTES, TensorMeta, parse_header


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` (several calls if the kernel returns fewer); the count read
    (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class SafetensorsFile:
    """An open safetensors file: its tensors' metadata, and :meth:`get_tensor` reading one into memory of its
    own. A context manager; the descriptor is closed on exit. Raises ``OSError`` as ``open`` does, and
    :class:`CheckpointError` (``corrupt``) for a header that does not describe the file."""

    def __init__(self, file: str | Path) -> None:
        self.file = str(file)
        self._fd = os.open(self.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(self._fd).st_size
            first = os.pread(self._fd, HEADER_LEN_BYTES, 0)
            n = struct.unpack("<Q", first)[0] if len(first) == HEADER_LEN_BYTES else 0
            if 0 < n <= MAX_HEADER_BYTES and HEADER_LEN_BYTES + n <= size:
                first += os.pread(self._fd, n, HEADER_LEN_BYTES)
            self.metas: dict[str, TensorMeta] = parse_header(first, size, self.file)
            self._data_start = HEADER_LEN_BYTES + n
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def keys(self) -> list[str]:
        return list(self.metas)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor owning its memory (its bytes as they are in the file now)."""
        meta = self.metas[name]
        raw = torch.empty(meta.nbytes, dtype=torch.uint8)
        got = pread_into(self._fd, memoryview(raw.numpy()), self._data_start + meta.start)  # type: ignore[arg-type]
        if got != meta.nbytes:
            raise CheckpointError(
                f"{self.file}: tensor {name!r}: {got} of its {meta.nbytes} bytes could be read: the file was "
                f"truncated while it was being read; publish checkpoints by renaming them into place "
                f"(`hotswap publish`), then retry", reason="changed_during_read")
        return raw.view(meta.dtype).reshape(meta.shape)
