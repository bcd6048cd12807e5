"""DMA straight out of the page cache: a checkpoint's pages registered with CUDA, no host copy.

The pinned pipeline (:mod:`serving.weights.fastpath`) moves each byte through host memory three
times: the kernel copies it from the page cache into a pinned buffer (read + write), then the GPU
reads the buffer. Here the file is mmapped read-only and its page-cache pages are page-locked in
place with ``cudaHostRegister`` (read-only, portable), window after window on several threads
ahead of the copies; the GPU then reads each byte once, straight from the page cache, and the
window is unregistered once its copies are done. The host CPU never touches the bytes.

Measured on an H200 host (bench/results/gpu-refit-transfer-h200.json): registering runs at 11 GB/s
on one thread and 19-20 GB/s on 2 to 16 (the driver serializes it), and the process's other CUDA
calls wait meanwhile, so this path is slower than the pinned ring there and is opt-in
(``weights_transfer: registered``).

This module is the edge to the CUDA runtime: :func:`plan_windows` is pure (page-aligned,
disjoint windows: two registrations may not share a page), :class:`HostRegistry` calls
``cudaHostRegister``/``cudaHostUnregister`` of the libcudart that torch loaded, through ctypes,
so the GIL is released while the driver pins pages (torch's own ``cudart()`` binding keeps it,
and would stall serving threads in the same process).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from serving.weights.fastpath import Chunk, Piece, TensorSource

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: cudaHostRegisterPortable | cudaHostRegisterReadOnly: pinned for every context, the pages are only read
REGISTER_FLAGS = 0x01 | 0x08


class RegisterError(RuntimeError):
    """cudaHostRegister refused a range (the file system does not allow it, out of pinnable memory, ...)."""


def plan_windows(sources: Iterable[TensorSource], window_bytes: int, page: int = PAGE) -> list[Chunk]:
    """Page-aligned, disjoint windows of at most ``window_bytes`` over the tensors' byte ranges. Pure.

    Each window is one registration; a :class:`Piece` is the part of a tensor inside one window
    (cut anywhere: the copies are byte copies). Ranges of one file closer than a page share a
    window, so no page is registered twice.
    """
    if window_bytes < page or window_bytes % page:
        raise ValueError(f"window_bytes={window_bytes} must be a positive multiple of the page size {page}")
    by_file: dict[str, list[TensorSource]] = {}
    for s in sources:
        if s.nbytes:
            by_file.setdefault(s.file, []).append(s)
    windows: list[Chunk] = []
    for file in sorted(by_file):
        srcs = sorted(by_file[file], key=lambda s: s.offset)
        spans: list[list[int]] = []  # page-aligned [start, end) covering the tensors, merged
        for s in srcs:
            a = s.offset - s.offset % page
            b = -(-(s.offset + s.nbytes) // page) * page
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        bounds = [(a, min(a + window_bytes, end)) for start, end in spans for a in range(start, end, window_bytes)]
        pieces: list[list[Piece]] = [[] for _ in bounds]
        w = 0
        for s in srcs:
            pos = s.offset
            end = s.offset + s.nbytes
            while bounds[w][1] <= pos:
                w += 1
            k = w
            while pos < end:
                lo, hi = bounds[k]
                take = min(end, hi) - pos
                pieces[k].append(Piece(s.name, pos - s.offset, pos - lo, take))
                pos += take
                k += 1
        windows += [Chunk(file, lo, hi - lo, tuple(p)) for (lo, hi), p in zip(bounds, pieces, strict=True) if p]
    return windows


def _loaded_cudart() -> tuple[ctypes.CDLL | None, str]:
    """The libcudart this process has mapped (torch's), and why not when there is none."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as e:
        return None, f"cannot read /proc/self/maps ({e})"
    paths = sorted({line.split()[-1] for line in maps.splitlines()
                    if "libcudart" in line and line.split()[-1].startswith("/")})
    if not paths:
        return None, "no libcudart is loaded in this process (torch's CUDA runtime is linked statically or not " \
                     "initialized)"
    # another runtime may be loaded too (a Triton stub's): prefer the one of torch's CUDA version
    major = (torch.version.cuda or "").split(".")[0]
    paths.sort(key=lambda p: 0 if major and f"libcudart.so.{major}" in p else 1)
    lib = ctypes.CDLL(paths[0])  # already loaded: dlopen returns the same library
    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostRegister.restype = ctypes.c_int
    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cudaHostUnregister.restype = ctypes.c_int
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaGetLastError.argtypes = []
    lib.cudaGetLastError.restype = ctypes.c_int
    return lib, paths[0]


class HostRegistry:
    """``cudaHostRegister``/``cudaHostUnregister`` of the loaded CUDA runtime (GIL released during calls)."""

    _shared: tuple[HostRegistry | None, str] | None = None
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL, where: str) -> None:
        self._lib = lib
        self.where = where

    @classmethod
    def get(cls) -> tuple[HostRegistry | None, str]:
        """The process's registry, or None and the reason registration is not available."""
        with cls._lock:
            if cls._shared is None:
                lib, where = _loaded_cudart()
                cls._shared = (cls(lib, where), where) if lib is not None else (None, where)
            return cls._shared

    def _error(self, code: int) -> str:
        self._lib.cudaGetLastError()  # clear it: torch's next launch check must not see our error
        name = self._lib.cudaGetErrorString(code)
        return f"CUDA error {code} ({name.decode() if name else 'unknown'})"

    def register(self, address: int, nbytes: int) -> None:
        code = self._lib.cudaHostRegister(address, nbytes, REGISTER_FLAGS)
        if code:
            raise RegisterError(f"cudaHostRegister of {nbytes} bytes: {self._error(code)}")

    def unregister(self, address: int) -> None:
        code = self._lib.cudaHostUnregister(address)
        if code:
            raise RegisterError(f"cudaHostUnregister: {self._error(code)}")


class MappedFile:
    """A file mmapped read-only and a uint8 tensor over it (the copies' source); :meth:`close` only once
    nothing of it is registered or being copied."""

    def __init__(self, fd: int) -> None:
        self.size = os.fstat(fd).st_size
        self.map: mmap.mmap | None = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        self.bytes: torch.Tensor | None = None
        if self.map is not None:
            with warnings.catch_warnings():  # read-only memory: the tensor is only ever a copy source
                warnings.simplefilter("ignore", UserWarning)
                self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.address = self.bytes.data_ptr() if self.bytes is not None else 0

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the file from ``offset``, as a CPU tensor over the mapping (use it in one statement:
        a view kept alive keeps the mapping open)."""
        if self.bytes is None:
            raise ValueError("the mapping is closed")
        return self.bytes[offset:offset + nbytes]

    def close(self) -> None:
        self.bytes = None  # the tensor holds an export of the mapping, which close() refuses while it lives
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                log.debug("weights transfer: a view of a mapped checkpoint outlived the read")
            self.map = None
