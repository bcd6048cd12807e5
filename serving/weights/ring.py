"""Our own reader threads: into a ring of pinned buffers for CUDA destinations (the fallback when KvikIO cannot
read), straight into the destinations' memory for CPU ones.

* **CUDA.** The tensors are cut into chunks of at most ``buffer_bytes`` (:func:`~serving.weights.plan.plan_chunks`).
  A pool of ``buffers`` pinned host buffers is reused chunk after chunk: ``threads`` threads ``os.preadv`` a
  chunk's byte range (in ``read_bytes`` pieces) into a free buffer while the buffers read before it are copied
  to the device on a side stream. A CUDA event per buffer says when its copy is done and the buffer may be
  refilled, so file reads, host-to-device copies and device work overlap. A tensor stored in the destination's
  dtype is copied straight into the destination; one stored in another floating-point dtype goes through a
  device scratch of one chunk and is cast on the device. NaN/Inf are looked for on the device, piece by piece;
  one synchronization at the end reads the verdicts. Each byte crosses host memory three times (page cache
  read, pinned buffer write, DMA read), which is why KvikIO, with fewer copies on the host and threads that
  hold no GIL, comes first.
* **CPU.** The threads ``preadv`` straight into the destination tensors' memory (through a scratch of one piece
  when a cast is needed) and check finiteness piece by piece.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from serving.background import lower_priority
from serving.weights.plan import Chunk, TensorSource, plan_chunks, short_in
from serving.weights.targets import Target, finite, finite_host, verdicts
from serving.weights.transfer import FastPathConfig

Timing = dict[str, float]


class _Pinned:
    """One pinned buffer of the pool and the event of the last copy out of it."""

    def __init__(self, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.view = bytes_view(self.host)
        self.event: torch.cuda.Event | None = None


def bytes_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU uint8 tensor's memory (what os.preadv fills)."""
    return memoryview(t.numpy())  # type: ignore[arg-type]


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` (several calls if the kernel returns fewer); the count read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class RingReader:
    """The reader threads, the pinned pool, the device scratch and the side streams; created on first use and
    kept until :meth:`close`. One read at a time (the caller holds the lock)."""

    def __init__(self, config: FastPathConfig) -> None:
        self.config = config
        self._executor: ThreadPoolExecutor | None = None
        self._pool: list[_Pinned] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def threads(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.config.threads, thread_name_prefix="hotswap-read",
                                                initializer=lower_priority)
        return self._executor

    def _pinned(self) -> list[_Pinned]:
        if not self._pool:
            self._pool = [_Pinned(self.config.buffer_bytes) for _ in range(self.config.buffers)]
        return self._pool

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _device_scratch(self, device: torch.device) -> torch.Tensor:
        if device not in self._scratch:
            self._scratch[device] = torch.empty(self.config.buffer_bytes, dtype=torch.uint8, device=device)
        return self._scratch[device]

    def close(self) -> None:
        """Stop the threads; free the pinned pool and the scratch."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for p in self._pool:
            if p.event is not None:
                p.event.synchronize()
        self._pool = []
        self._scratch.clear()
        self._streams.clear()

    def _read_ranges(self, chunk: Chunk, view: memoryview, fd: int) -> list[tuple[int, int, Future[int]]]:
        """Submit the reads of ``chunk`` into ``view`` (``read_bytes`` at a time)."""
        step = self.config.read_bytes
        ex = self.threads()
        return [(a, min(step, chunk.nbytes - a),
                 ex.submit(pread_full, fd, view[a:a + min(step, chunk.nbytes - a)], chunk.offset + a))
                for a in range(0, chunk.nbytes, step)]

    # -- CUDA -----------------------------------------------------------------

    def run_cuda(self, sources: Sequence[TensorSource], targets: Mapping[str, Target], fds: Mapping[str, int],
                 device: torch.device) -> tuple[Timing, dict[str, bool], int]:
        chunks = plan_chunks(sources, self.config.buffer_bytes)
        pool = self._pinned()
        stream = self._stream(device)
        scratch = self._device_scratch(device) if any(not t.direct for t in targets.values()) else None
        # the destinations may still be read by work queued on the serving stream (a slot's last request)
        stream.wait_stream(torch.cuda.current_stream(device))
        flags: list[tuple[str, torch.Tensor]] = []
        pending: deque[tuple[Chunk, _Pinned, list[tuple[int, int, Future[int]]]]] = deque()
        timing = {"wait_read": 0.0, "wait_copy": 0.0, "finish": 0.0}

        def dispatch(chunk: Chunk, buf: _Pinned, reads: list[tuple[int, int, Future[int]]]) -> None:
            t = time.perf_counter()
            wait_futures([f for _, _, f in reads])  # all of them, even when one failed: none may still write
            for a, n, fut in reads:
                got = fut.result()
                if got != n:
                    raise short_in(chunk.pieces, chunk.file, chunk.offset, chunk.offset + a + got)
            timing["wait_read"] += time.perf_counter() - t
            with torch.cuda.stream(stream):
                for p in chunk.pieces:
                    tgt = targets[p.name]
                    if tgt.skip:
                        continue
                    host = buf.host[p.chunk_offset:p.chunk_offset + p.nbytes]
                    if tgt.direct:
                        tgt.dest_bytes()[p.tensor_offset:p.tensor_offset + p.nbytes].copy_(host, non_blocking=True)
                        if tgt.check:
                            flags.append((p.name, finite(tgt.written(p.tensor_offset, p.nbytes))))
                        continue
                    assert scratch is not None
                    raw = scratch[:p.nbytes]
                    raw.copy_(host, non_blocking=True)
                    out = tgt.take(raw, p.tensor_offset)
                    if tgt.check:
                        flags.append((p.name, finite(out)))
                buf.event = torch.cuda.Event()
                buf.event.record(stream)

        try:
            for i, chunk in enumerate(chunks):
                if len(pending) == len(pool):
                    dispatch(*pending.popleft())
                buf = pool[i % len(pool)]
                if buf.event is not None:
                    t = time.perf_counter()
                    buf.event.synchronize()  # its last copy must be done before it is refilled
                    timing["wait_copy"] += time.perf_counter() - t
                pending.append((chunk, buf, self._read_ranges(chunk, buf.view, fds[chunk.file])))
            while pending:
                dispatch(*pending.popleft())
        except BaseException:
            for _, _, reads in pending:  # no thread may write into a buffer we hand back
                for _, _, fut in reads:
                    fut.cancel()
                wait_futures([f for _, _, f in reads])
            stream.synchronize()
            raise
        t = time.perf_counter()
        stream.synchronize()
        ok = verdicts(flags)
        timing["finish"] = time.perf_counter() - t
        return timing, ok, len(chunks)

    # -- CPU ------------------------------------------------------------------

    def run_cpu(self, sources: Sequence[TensorSource], targets: Mapping[str, Target],
                fds: Mapping[str, int]) -> tuple[Timing, dict[str, bool], int]:
        chunks = plan_chunks(sources, self.config.read_bytes)

        def work(chunk: Chunk) -> list[tuple[str, bool]]:
            fd = fds[chunk.file]
            found = []
            for p in chunk.pieces:
                tgt = targets[p.name]
                if tgt.skip:
                    continue
                at = chunk.offset + p.chunk_offset
                if tgt.direct:
                    view = bytes_view(tgt.dest_bytes())[p.tensor_offset:p.tensor_offset + p.nbytes]
                    got = pread_full(fd, view, at)
                    out = tgt.written(p.tensor_offset, p.nbytes)
                else:
                    raw = torch.empty(p.nbytes, dtype=torch.uint8)
                    got = pread_full(fd, bytes_view(raw), at)
                    out = tgt.take(raw, p.tensor_offset) if got == p.nbytes else raw
                if got != p.nbytes:
                    raise short_in([p], chunk.file, chunk.offset, at + got)
                if tgt.check:
                    found.append((p.name, finite_host(out)))
            return found

        ex = self.threads()
        futures = [ex.submit(work, c) for c in chunks]
        t = time.perf_counter()
        try:
            results = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            wait_futures(futures)
            raise
        ok: dict[str, bool] = {}
        for found in results:
            for name, good in found:
                ok[name] = ok.get(name, True) and good
        return {"wait_read": time.perf_counter() - t}, ok, len(chunks)
