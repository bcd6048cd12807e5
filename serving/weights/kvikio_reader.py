"""KvikIO reads a checkpoint's byte ranges straight into the destination tensors (the edge to the library).

``kvikio.CuFile(path, "r").pread(buf, size, file_offset, task_size)`` cuts a read into tasks of ``task_size``
bytes that KvikIO's own C++ threads carry out (no GIL held): in compat mode each thread ``pread``\\s into its
pinned bounce buffer and copies it to the device on its own stream; with GPUDirect Storage the bytes go disk to
GPU. The future's ``get()`` returns once the bytes are in device memory.

The plan (:func:`~serving.weights.plan.plan_steps`) reads a tensor stored in its destination's dtype in one
``pread`` straight into the destination tensor, then checks it for NaN/Inf on a side stream. Every other tensor
(a cast, or a scan that keeps nothing) goes chunk by chunk through a device scratch of ``SLOTS`` chunks of
``buffer_bytes``, cast or checked on the device from there: the scratch is bounded by the chunk, never the
model. Reads stay ``window`` bytes ahead of the checks, so a failed read stops the load early.

KvikIO's thread pool, task size and bounce buffers belong to the process (``kvikio.defaults``): the reader sets
them on first use and restores what it found on :meth:`KvikIOReader.close`, which stops its threads. A
served model is alone in its Python-backend process, so its settings are its own.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from serving.errors import CheckpointError, reading
from serving.weights.plan import Step, TensorSource, past_end, plan_steps, short_in
from serving.weights.targets import Target, finite, verdicts
from serving.weights.transfer import FastPathConfig, KvikIOStatus

#: scratch slots for casts and scans: one being read into while the other is cast from
SLOTS = 2
#: bytes of a checkpoint file that the probe reads through KvikIO and compares with os.pread
PROBE_BYTES = 4096


def load_kvikio() -> tuple[Any | None, str]:
    """The ``kvikio`` module, or None and why it does not import (not installed, or its loader cannot find
    ``libcufile``: no CUDA here)."""
    try:
        kvikio = importlib.import_module("kvikio")
        importlib.import_module("kvikio.defaults")
    except Exception as e:  # ImportError, or the library loader's own error (a missing libcufile)
        first = str(e).splitlines()[0] if str(e) else ""
        return None, f"kvikio does not import ({type(e).__name__}: {first})"
    with contextlib.suppress(Exception):  # only says whether GDS is available; compat mode works without it
        importlib.import_module("kvikio.cufile_driver")
    return kvikio, "imported"


def gds_state(kvikio: Any) -> tuple[bool, str]:
    """Whether KvikIO reads through GPUDirect Storage here, and what it said."""
    try:
        if kvikio.defaults.is_compat_mode_preferred():
            return False, "compat mode: no GPUDirect Storage here, reads go through KvikIO's pinned bounce buffers"
        driver = getattr(kvikio, "cufile_driver", None)
        if driver is not None and not driver.get("is_gds_available"):
            return False, "cuFile loaded but GPUDirect Storage is not available: cuFile's own compat mode"
        return True, "cuFile with GPUDirect Storage: disk to GPU"
    except Exception as e:  # a library that cannot say
        return False, f"GDS state unknown ({type(e).__name__}: {e})"


def buffer_of(t: torch.Tensor) -> Any:
    """What ``CuFile.pread`` takes: a CUDA tensor (``__cuda_array_interface__``), or a host buffer."""
    return t if t.is_cuda else t.numpy()


def probe(kvikio: Any, file: str, device: torch.device) -> KvikIOStatus:
    """Whether KvikIO reads here: the first bytes of ``file`` (a real checkpoint, on its real file system)
    read through KvikIO into ``device`` must equal what ``os.pread`` returns."""
    version = str(getattr(kvikio, "__version__", "?"))
    try:
        with open(file, "rb") as f:
            want = f.read(PROBE_BYTES)
        buf = torch.zeros(len(want), dtype=torch.uint8, device=device)
        handle = kvikio.CuFile(file, "r")
        try:
            got = handle.pread(buffer_of(buf), len(want), 0, PROBE_BYTES).get()
        finally:
            handle.close()
        if got != len(want) or bytes(buf.cpu().numpy().tobytes()) != want:
            return KvikIOStatus(False, f"a test read of {file} through KvikIO {version} came back wrong "
                                       f"({got} of {len(want)} bytes)", version)
    except Exception as e:  # anything the library raises means it does not work here
        return KvikIOStatus(False, f"a test read of {file} through KvikIO {version} failed "
                                   f"({type(e).__name__}: {e})", version)
    gds, why = gds_state(kvikio)
    return KvikIOStatus(True, f"a test read of {file} matched", version, gds=gds, gds_reason=why)


def read_error(exc: BaseException, step: Step, size_now: int | None) -> CheckpointError:
    """A failed KvikIO read as the fast path's error: the short-file error when the file no longer holds the
    range (KvikIO reports EOF), otherwise an unreadable file, naming the range and its first tensor. Pure."""
    end = step.offset + step.nbytes
    if size_now is not None and size_now < end:
        return short_in(step.pieces, step.file, step.offset, size_now)
    return CheckpointError(f"{step.file}: reading bytes {step.offset}..{end} (tensor {step.first!r}) through "
                           f"KvikIO failed: {exc}", reason="unreadable")


def _size(file: str) -> int | None:
    try:
        return os.stat(file).st_size
    except OSError:
        return None


class _Device:
    """The side stream and its events on CUDA; nothing to order on the host."""

    def __init__(self, stream: torch.cuda.Stream | None) -> None:
        self.stream = stream

    def on(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class KvikIOReader:
    """Runs plans through KvikIO; keeps its scratch and side streams across reads until :meth:`close`.
    One read at a time (the caller holds the lock)."""

    def __init__(self, config: FastPathConfig, kvikio: Any) -> None:
        self.config = config
        self.kvikio = kvikio
        self._found: dict[str, Any] | None = None  # the process's KvikIO settings before ours
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        #: bytes read ahead of the checks (enough to keep every thread busy)
        self.window = max(2 * config.threads * config.task_bytes, config.buffer_bytes)

    def scratch_bytes(self) -> int:
        """Bytes of scratch held (at most ``SLOTS * buffer_bytes`` per device)."""
        return sum(t.numel() for t in self._scratch.values())

    def _configure(self) -> None:
        want = {"num_threads": self.config.threads, "task_size": self.config.task_bytes}
        current = {k: self.kvikio.defaults.get(k) for k in want}
        if self._found is None:
            self._found = current
        if current != want:
            self.kvikio.defaults.set(want)

    def close(self) -> None:
        """Give KvikIO back the settings found (its pool shrinks back: our threads stop), free its bounce
        buffers, the scratch and the streams."""
        if self._found is not None:
            self.kvikio.defaults.set(self._found)
            self._found = None
            free = getattr(self.kvikio, "bounce_buffer_free", None)
            if free is not None:
                free()
        self._scratch.clear()
        self._streams.clear()

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _slots(self, device: torch.device) -> torch.Tensor:
        if device not in self._scratch:
            self._scratch[device] = torch.empty(SLOTS, self.config.buffer_bytes, dtype=torch.uint8, device=device)
        return self._scratch[device]

    @contextlib.contextmanager
    def _open(self, files: Sequence[str]) -> Iterator[dict[str, Any]]:
        handles: dict[str, Any] = {}
        try:
            for file in files:
                with reading(file, gone="deleted before it was read"):
                    try:
                        handles[file] = self.kvikio.CuFile(file, "r")
                    except OSError:
                        raise
                    except Exception as e:  # the library's own error for a file it cannot open
                        raise CheckpointError(f"{file}: KvikIO cannot open it: {e}", reason="unreadable") from e
            yield handles
        finally:
            for h in handles.values():
                h.close()

    def run(self, sources: Sequence[TensorSource], targets: Mapping[str, Target], sizes: Mapping[str, int],
            device: torch.device) -> tuple[dict[str, float], dict[str, bool], int]:
        """Read ``sources`` into their targets on ``device``; the timings, the finiteness verdicts, the step
        count. Raises the fast path's errors (short file, unreadable) naming the file and the tensor."""
        wanted = [s for s in sources if not targets[s.name].skip]
        short = past_end(wanted, sizes)
        if short is not None:
            raise short
        steps = plan_steps(wanted, {s.name for s in wanted if not targets[s.name].direct}, self.config.buffer_bytes,
                           SLOTS)
        self._configure()
        dev = _Device(self._stream(device))
        slots = self._slots(device) if any(not s.direct for s in steps) else None
        if device.type == "cuda":
            # KvikIO's streams do not wait for ours: work queued on the serving stream (a slot's last request
            # still reading the tensors about to be written) must be done before the first read
            torch.cuda.current_stream(device).synchronize()
        flags: list[tuple[str, torch.Tensor]] = []
        events: list[torch.cuda.Event | None] = [None] * SLOTS
        pending: deque[tuple[Step, Any]] = deque()
        timing = {"wait_read": 0.0, "wait_copy": 0.0, "finish": 0.0}
        task = self.config.task_bytes
        ahead = 0

        def dispatch() -> None:
            nonlocal ahead
            step, fut = pending.popleft()
            ahead -= step.nbytes
            t = time.perf_counter()
            try:
                got = fut.get()
            except Exception as e:
                raise read_error(e, step, _size(step.file)) from e
            timing["wait_read"] += time.perf_counter() - t
            if got != step.nbytes:
                raise short_in(step.pieces, step.file, step.offset, step.offset + got)
            with dev.on():
                for p in step.pieces:
                    tgt = targets[p.name]
                    if step.direct:
                        out = tgt.written(p.tensor_offset, p.nbytes)
                    else:
                        assert slots is not None
                        out = tgt.take(slots[step.slot][p.chunk_offset:p.chunk_offset + p.nbytes], p.tensor_offset)
                    if tgt.check:
                        flags.append((p.name, finite(out)))
                if not step.direct:
                    events[step.slot] = dev.record()

        with self._open(sorted({s.file for s in steps})) as handles:
            try:
                for step in steps:
                    if step.direct:
                        buf = targets[step.first].dest_bytes()
                    else:
                        assert slots is not None
                        while any(not q.direct and q.slot == step.slot for q, _ in pending):
                            dispatch()  # the slot's last chunk is read and its casts are queued
                        event = events[step.slot]
                        if event is not None:
                            t = time.perf_counter()
                            event.synchronize()  # ... and done before the slot is refilled
                            timing["wait_copy"] += time.perf_counter() - t
                        buf = slots[step.slot][:step.nbytes]
                    try:  # a read below KvikIO's gds_threshold runs in this thread: its errors come from here
                        fut = handles[step.file].pread(buffer_of(buf), step.nbytes, step.offset, task)
                    except Exception as e:
                        failed = read_error(e, step, _size(step.file))
                        while pending:
                            dispatch()  # an earlier range that failed too is the one to name
                        raise failed from e
                    pending.append((step, fut))
                    ahead += step.nbytes
                    while ahead > self.window and len(pending) > 1:
                        dispatch()
                while pending:
                    dispatch()
            except BaseException:
                for _, fut in pending:  # no KvikIO thread may still write into memory we hand back
                    with contextlib.suppress(Exception):
                        fut.get()
                dev.sync()
                raise
        t = time.perf_counter()
        dev.sync()
        ok = verdicts(flags)
        timing["finish"] = time.perf_counter() - t
        return timing, ok, len(steps)
