"""The limits a benchmark compares its figures with, measured in the same run: pinned host to device
copies and the reader threads alone on the page cache or the disk."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

GB = 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pinned_copy_seconds(nbytes: int, device: str, chunk: int = 1 << 30, repeats: int = 3) -> float:
    """Pinned host -> device of ``nbytes`` (in 1 GiB copies), median of ``repeats``; CUDA events.
    NaN on a device that is not CUDA."""
    if not device.startswith("cuda"):
        return float("nan")
    chunk = min(chunk, nbytes)
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        left = nbytes
        while left > 0:
            n = min(chunk, left)
            dst[:n].copy_(src[:n], non_blocking=True)
            left -= n
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return statistics.median(times[1:])


def page_cache_read_gbps(path: Path, threads: int, read_bytes: int, buffer_bytes: int = 1 << 30) -> float:
    """The reader threads alone: page cache -> one pinned (or plain) buffer, ``os.preadv``; best of two."""
    size = os.path.getsize(path)
    n = min(size, buffer_bytes)
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    view = memoryview(buf.numpy())  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as ex:
            best = 0.0
            for _ in range(2):
                t0 = time.perf_counter()
                done = 0
                while done < size:
                    m = min(n, size - done)
                    list(ex.map(lambda a, d=done, m=m: os.preadv(fd, [view[a:min(a + read_bytes, m)]], d + a),
                                range(0, m, read_bytes)))
                    done += m
                best = max(best, size / (time.perf_counter() - t0) / GB)
    finally:
        os.close(fd)
    return best


def disk_read_gbps(path: Path, threads: int = 16, step: int = 16 << 20) -> float:
    """The reader threads on a file evicted from the page cache: what the disk gives."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(offset: int) -> int:
            return len(os.pread(fd, step, offset))

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            done = sum(ex.map(read, range(0, size, step)))
        return done / (time.perf_counter() - t) / GB
    finally:
        os.close(fd)
