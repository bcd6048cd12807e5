"""The fast weight path: safetensors bytes straight into preallocated destination tensors.

How a checkpoint travels (safetensors, single file or shards; page cache or disk):

* **CUDA destinations.** The tensors to read are cut into chunks of at most ``buffer_bytes``
  (small tensors that lie next to each other in a file share a chunk; a large one spans several,
  cut on element boundaries). A pool of ``buffers`` pinned host buffers is reused chunk after
  chunk: ``threads`` threads ``os.preadv`` a chunk's byte range (in ``read_bytes`` pieces) into a
  free buffer while the buffers read before it are copied to the device on a side CUDA stream.
  A CUDA event per buffer says when its copy is done and the buffer may be refilled, so the file
  reads, the host-to-device copies and the device work overlap (the pool is the double/triple
  buffer). A tensor stored in the destination's dtype is copied straight into the destination
  tensor (no full-size pageable copy, no extra device copy); one stored in another floating-point
  dtype is copied into a device scratch of one chunk and cast on the device into the destination.
  NaN/Inf are looked for on the device, piece by piece, on the side stream; one synchronization
  at the end reads the verdicts.
* **CPU destinations** (this is the CPU path, not a fallback): the threads ``preadv`` straight
  into the destination tensors' memory (through a scratch of one piece when a cast is needed)
  and check finiteness piece by piece.

Either way nothing but the destination tensors (and the small pool) is allocated, and a reader
(:class:`FastReader`) keeps its pool, its threads and its stream from one refit to the next.

Memory, and the trade-off behind the coordinator's two strategies on a GPU
(``serving/refit/`` decides; this module only fills the tensors it is given):

* ``double_buffer`` holds two device copies of the model: the live one and the standby one.
  A refit writes the new checkpoint into the standby slot's tensors (allocated once, then reused),
  so the peak is two model copies plus one chunk of scratch; the swap is a pointer switch, and a
  rollback to the previous version is a pointer switch too (its tensors are still in the standby
  slot until the next refit overwrites them).
* ``in_place`` holds one device copy, so a model larger than half the GPU fits. The new weights
  are first streamed through the pool and checked (NaN/Inf, cast overflow) off the serving path,
  without being kept (``scan``: one extra pass over the bytes, no memory); then requests are held,
  the checkpoint is streamed again straight into the live tensors, and serving resumes. The pause
  is one file-to-device pass (the file's bytes over the pipeline's rate), not a device-side copy.
  The alternative, staging the whole checkpoint in pinned host memory first, would shorten the
  pause to a pinned copy (~55 GB/s instead of the ~40 GB/s of file reads) but costs a pinned
  buffer as large as the model (tens of GB of host memory that cannot be paged, and seconds to
  pin); we chose the extra read instead. When the new weights fail after they were written (the
  canary), the last good ones are streamed back from their own checkpoint file, so in-place mode
  keeps no second copy anywhere: ``previous`` is a reference to a file, re-read on rollback.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serving.background import lower_priority
from serving.choices import READ_BYTES, READ_BYTES_BOUNDS, READER_THREADS, READER_THREADS_BOUNDS, TRANSFERS
from serving.errors import CheckpointError, ConfigError, RefitError, ValidationError, reading
from serving.specs import WeightSpec, dtype_name
from serving.weights.checkpoint import CheckpointCandidate, _baseline, _verify_unchanged
from serving.weights.safetensors_header import HEADER_LEN_BYTES, TensorMeta
from serving.weights.validate import CASTABLE_FLOATS, _all_finite, _finite_problem

if TYPE_CHECKING:
    from serving.weights.registered import HostRegistry

log = logging.getLogger(__name__)

MiB = 1 << 20

@dataclass(frozen=True)
class FastPathConfig:
    """Sizes of the pipeline. The defaults use 384 MiB of pinned memory and 8 reader threads.

    Chosen on H200 hosts of 16 CPUs (docs/gpu.md, one run each, and hosts differ: the threads alone read
    the page cache at 31 to 42 GB/s from one machine to the next): 16 MiB reads with 6 buffers came
    closest to the read rate of their host (84-92% of it, against 77% for 4 MiB reads with 4 buffers).
    16 threads stream about 15% faster than 8, but they take every CPU of such a host: requests served
    through Triton during a refit then took 2.4x their steady time, against 1.4x with 8 threads
    (bench/results/gpu-publish-readers-*-h200.json). Serving comes first, so 8 (setting
    ``weights_reader_threads``).
    """

    #: reader threads (each reads ``read_bytes`` at a time with ``os.preadv``)
    threads: int = READER_THREADS
    #: pinned buffers in the pool (CUDA): at least 2 so that reading and copying overlap
    buffers: int = 6
    #: size of each pinned buffer, i.e. the most bytes one chunk carries
    buffer_bytes: int = 64 * MiB
    #: bytes per read call
    read_bytes: int = READ_BYTES
    #: how bytes reach a CUDA destination (:data:`serving.choices.TRANSFERS`: why ``pinned`` by default; a cast,
    #: or a file whose pages cannot be registered, goes the pinned way, logged)
    transfer: str = "pinned"
    #: registered transfers: bytes of page cache registered at a time (a multiple of the page size)
    window_bytes: int = 64 * MiB
    #: registered transfers: windows registered ahead of the copies (on the reader threads)
    windows_ahead: int = 8

    def __post_init__(self) -> None:
        problems = []
        if self.transfer not in TRANSFERS:
            problems.append(f"transfer={self.transfer!r} (one of {', '.join(TRANSFERS)})")
        if self.window_bytes < MiB or self.window_bytes % (64 << 10):
            problems.append(f"window_bytes={self.window_bytes} (need >= 1 MiB and a multiple of 64 KiB)")
        if self.windows_ahead < 1:
            problems.append(f"windows_ahead={self.windows_ahead} (need >= 1)")
        problems += [f"threads={self.threads} ({p})" for p in READER_THREADS_BOUNDS.problems(self.threads)]
        if self.buffers < 2:
            problems.append(f"buffers={self.buffers} (need >= 2 to overlap reads and copies)")
        if self.buffer_bytes < MiB or self.buffer_bytes % 64:
            problems.append(f"buffer_bytes={self.buffer_bytes} (need >= 1 MiB and a multiple of 64)")
        problems += [f"read_bytes={self.read_bytes} ({p})" for p in READ_BYTES_BOUNDS.problems(self.read_bytes)]
        if problems:
            raise ConfigError("FastPathConfig: " + ", ".join(problems))


# --------------------------------------------------------------------------- planning (pure)


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


def plan_chunks(sources: Iterable[TensorSource], chunk_bytes: int) -> list[Chunk]:
    """Cut the tensors' byte ranges into chunks of at most ``chunk_bytes``. Pure.

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
    two names sharing memory). Pure."""
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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ReadStats:
    """What one read did, and where its time went."""

    bytes: int
    seconds: float
    chunks: int
    device: str
    #: time the dispatcher waited for file reads (I/O or page-cache bound when it dominates)
    wait_read_s: float = 0.0
    #: time the dispatcher waited for a pinned buffer to come back from the GPU (PCIe bound)
    wait_copy_s: float = 0.0
    #: the final synchronization and the finiteness verdicts
    finish_s: float = 0.0
    #: tensors cast on the way (checkpoint dtype != engine dtype)
    cast: tuple[str, ...] = ()
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Target:
    """One tensor's destination (or None when only scanning) and how to fill it."""

    index: int
    src: TensorSource
    dtype: torch.dtype  # the engine's dtype
    dest: torch.Tensor | None
    check: bool

    @property
    def cast(self) -> bool:
        return self.src.dtype != self.dtype

    def dest_elems(self) -> torch.Tensor:
        assert self.dest is not None
        return self.dest.detach().view(-1)

    def dest_bytes(self) -> torch.Tensor:
        return self.dest_elems().view(torch.uint8)


def _needs_finite_check(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _finite(x: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on x's device, computed without a host synchronization."""
    if x.dtype not in CASTABLE_FLOATS and not x.is_complex():
        x = x.float()  # float8 and friends: isfinite is not implemented for every one of them
    return torch.isfinite(x).all()


def _finite_host(x: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no NaN/Inf: the validator's sum test (one read of the piece, no mask; element by
    element only when the sum overflows), where ``isfinite(x).all()`` writes and reads a mask as large as the piece."""
    if x.dtype not in CASTABLE_FLOATS and not x.is_complex():
        x = x.float()
    return _all_finite(x)


class _Pinned:
    """One pinned buffer of the pool and the event of the last copy out of it."""

    def __init__(self, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.view = _bytes_view(self.host)
        self.event: torch.cuda.Event | None = None


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU uint8 tensor's memory (what os.preadv fills)."""
    return memoryview(t.numpy())  # type: ignore[arg-type]


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` (several calls if the kernel returns fewer); the count read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _short_file(file: str, size: int, name: str, end: int) -> CheckpointError:
    return CheckpointError(
        f"{file}: the file ends at byte {size} but its header places tensor {name!r} up to byte {end}: the file "
        f"is shorter than its header claims (truncated, or rewritten while being read); write checkpoints "
        f"elsewhere and rename them into place", reason="corrupt")


def _verdicts(flags: Sequence[tuple[str, torch.Tensor]]) -> dict[str, bool]:
    """Per tensor, whether all its finiteness flags (0-d device tensors) are true: one host synchronization."""
    ok: dict[str, bool] = {}
    if flags:
        verdicts = torch.stack([f for _, f in flags]).cpu().tolist()
        for (name, _), good in zip(flags, verdicts, strict=True):
            ok[name] = ok.get(name, True) and bool(good)
    return ok


# --------------------------------------------------------------------------- the reader


class FastReader:
    """Reads safetensors tensors into destination tensors; reusable, one read at a time.

    The pinned pool, the device scratch, the side stream and the threads are created on first use
    and kept until :meth:`close`.
    """

    def __init__(self, config: FastPathConfig | None = None) -> None:
        self.config = config or FastPathConfig()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pool: list[_Pinned] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._said: set[str] = set()

    # -- resources ------------------------------------------------------------

    def _threads(self) -> ThreadPoolExecutor:
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
        """Stop the threads and free the pinned pool and the scratch."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for p in self._pool:
                if p.event is not None:
                    p.event.synchronize()
            self._pool = []
            self._scratch.clear()
            self._streams.clear()

    def __enter__(self) -> FastReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ---------------------------------------------------------------

    def read_into(self, sources: Sequence[TensorSource], specs: Mapping[str, WeightSpec],
                  dest: Mapping[str, torch.Tensor], *, check_finite: bool = True,
                  source: str = "checkpoint") -> ReadStats:
        """Fill ``dest[name]`` with each source tensor, cast to ``specs[name].dtype``.

        Raises :class:`ValidationError` naming every tensor with NaN/Inf (or that overflows when
        cast), and :class:`CheckpointError` when a file cannot be read or ends early. The
        destination tensors hold garbage after an error.
        """
        names = [s.name for s in sources]
        problems = destination_problems(specs, dest, names)
        if problems:
            raise ConfigError(f"{source}: destination tensors do not fit: " + "; ".join(problems))
        devices = {dest[n].device for n in names}
        device = next(iter(devices)) if devices else torch.device("cpu")
        return self._run(sources, specs, dest, device, check_finite, source)

    def scan(self, sources: Sequence[TensorSource], specs: Mapping[str, WeightSpec], device: torch.device | str,
             *, source: str = "checkpoint") -> ReadStats:
        """Read and check every tensor (NaN/Inf, cast overflow) without keeping it.

        The in-place strategy calls this off the serving path, before it holds requests.
        """
        return self._run(sources, specs, None, torch.device(device), True, source)

    # -- implementation ---------------------------------------------------------

    def _run(self, sources: Sequence[TensorSource], specs: Mapping[str, WeightSpec],
             dest: Mapping[str, torch.Tensor] | None, device: torch.device, check_finite: bool,
             source: str) -> ReadStats:
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{source}: the fast path reads into cpu or cuda tensors, not {device}")
        targets = {
            s.name: _Target(i, s, specs[s.name].dtype, None if dest is None else dest[s.name],
                            check_finite and _needs_finite_check(specs[s.name].dtype))
            for i, s in enumerate(sources)
        }
        with self._lock:
            t0 = time.perf_counter()
            fds: dict[str, int] = {}
            try:
                with reading(source, gone="deleted before it was read"):
                    for s in sources:
                        if s.file not in fds:
                            fds[s.file] = os.open(s.file, os.O_RDONLY)
                    if device.type == "cuda":
                        timing, ok, nchunks = self._run_device(sources, targets, fds, device, source)
                    else:
                        chunks = plan_chunks(sources, self.config.read_bytes)
                        timing, ok = self._run_cpu(chunks, targets, fds)
                        nchunks = len(chunks)
            finally:
                for fd in fds.values():
                    os.close(fd)
            bad = sorted((t for t in targets.values() if t.check and not ok.get(t.src.name, True)),
                         key=lambda t: t.index)
            if bad:
                raise ValidationError(source, [self._describe(t) for t in bad])
            seconds = time.perf_counter() - t0
        return ReadStats(
            bytes=sum(s.nbytes for s in sources), seconds=seconds, chunks=nchunks, device=str(device),
            wait_read_s=timing.get("wait_read", 0.0), wait_copy_s=timing.get("wait_copy", 0.0),
            finish_s=timing.get("finish", 0.0), cast=tuple(n for n, t in targets.items() if t.cast),
            extra={k: v for k, v in timing.items() if k not in ("wait_read", "wait_copy", "finish")},
        )

    @staticmethod
    def _short(chunk: Chunk, got: int, want: int, at: int) -> CheckpointError:
        piece = next((p for p in chunk.pieces if p.chunk_offset + p.nbytes > at), chunk.pieces[-1])
        return _short_file(chunk.file, chunk.offset + at + got, piece.name,
                           chunk.offset + piece.chunk_offset + piece.nbytes)

    def _read_ranges(self, chunk: Chunk, view: memoryview, fd: int) -> list[tuple[int, int, Future[int]]]:
        """Submit the reads of ``chunk`` into ``view`` (``read_bytes`` at a time)."""
        step = self.config.read_bytes
        ex = self._threads()
        return [(a, min(step, chunk.nbytes - a),
                 ex.submit(_pread_full, fd, view[a:a + min(step, chunk.nbytes - a)], chunk.offset + a))
                for a in range(0, chunk.nbytes, step)]

    def _run_device(self, sources: Sequence[TensorSource], targets: Mapping[str, _Target], fds: Mapping[str, int],
                    device: torch.device, source: str) -> tuple[dict[str, float], dict[str, bool], int]:
        """CUDA destinations: tensors stored in the engine's dtype by registered DMA (unless ``pinned``),
        every other one (a cast, a scan, a file whose pages cannot be registered) through the pinned ring."""
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        direct = [s for s in sources if targets[s.name].dest is not None and not targets[s.name].cast] \
            if self.config.transfer == "registered" else []
        timing: dict[str, float] = {}
        ok: dict[str, bool] = {}
        count = 0
        done: set[str] = set()
        if direct:
            from serving.weights.registered import HostRegistry

            registry, why = HostRegistry.get()
            if registry is None:
                raise ConfigError(f"weights transfer 'registered': the CUDA runtime cannot be called ({why}); set "
                                  "weights_transfer to 'pinned'")
            else:
                t, o, count, done = self._run_registered(direct, targets, fds, device, registry, source)
                timing.update(t)
                ok.update(o)
        rest = [s for s in sources if s.name not in done]
        if rest:
            chunks = plan_chunks(rest, self.config.buffer_bytes)
            t, o = self._run_cuda(chunks, targets, fds, device, source)
            for k, v in t.items():
                timing[k] = timing.get(k, 0.0) + v
            for k, good in o.items():
                ok[k] = ok.get(k, True) and good
            count += len(chunks)
        return timing, ok, count

    def _not_registered(self, why: str) -> None:
        """A file whose pages cannot be registered goes through the pinned ring: said once per reason."""
        if why not in self._said:
            self._said.add(why)
            log.warning("weights transfer: through pinned buffers, not registered page cache: %s", why)

    def _run_registered(self, sources: Sequence[TensorSource], targets: Mapping[str, _Target],
                        fds: Mapping[str, int], device: torch.device, registry: HostRegistry,
                        source: str) -> tuple[dict[str, float], dict[str, bool], int, set[str]]:
        """DMA from the files' page cache, registered window by window on the reader threads (see
        :mod:`serving.weights.registered`). Returns the timings, the finiteness verdicts, the window count
        and the names it filled (a file whose first page cannot be registered is left to the pinned ring)."""
        from serving.weights.registered import PAGE, MappedFile, RegisterError, plan_windows

        maps: dict[str, MappedFile] = {}
        stream = self._stream(device)
        held: set[int] = set()  # registered, no unregister job yet
        pending: deque[tuple[Chunk, int, Future[None]]] = deque()
        releases: deque[Future[None]] = deque()
        timing = {"wait_register": 0.0, "wait_release": 0.0, "finish": 0.0}
        try:
            for s in sources:
                if s.file not in maps:
                    maps[s.file] = MappedFile(fds[s.file])
                if s.offset + s.nbytes > maps[s.file].size:
                    raise _short_file(s.file, maps[s.file].size, s.name, s.offset + s.nbytes)
            usable = set()
            for file, m in maps.items():
                first = min(s.offset for s in sources if s.file == file)
                try:
                    registry.register(m.address + first - first % PAGE, PAGE)
                    registry.unregister(m.address + first - first % PAGE)
                    usable.add(file)
                except RegisterError as e:
                    self._not_registered(f"{file}: its pages cannot be registered with CUDA ({e})")
            chosen = [s for s in sources if s.file in usable]
            windows = plan_windows(chosen, self.config.window_bytes)
            last = {p.name: i for i, w in enumerate(windows) for p in w.pieces}
            ex = self._threads()
            stream.wait_stream(torch.cuda.current_stream(device))
            flags: list[tuple[str, torch.Tensor]] = []
            ahead = self.config.windows_ahead

            def start(i: int) -> None:
                w = windows[i]
                address = maps[w.file].address + w.offset
                pending.append((w, address, ex.submit(registry.register, address, w.nbytes)))

            for i in range(min(ahead, len(windows))):
                start(i)
            for i in range(len(windows)):
                w, address, fut = pending.popleft()
                t = time.perf_counter()
                try:
                    fut.result()
                except RegisterError as e:
                    raise RefitError(f"{source}: {w.file}: registering bytes {w.offset}..{w.offset + w.nbytes} "
                                     f"with CUDA failed ({e}); nothing was swapped; if it happens again, set "
                                     f"weights_transfer to 'pinned'") from e
                held.add(address)
                timing["wait_register"] += time.perf_counter() - t
                mapped = maps[w.file]
                with torch.cuda.stream(stream):
                    for p in w.pieces:
                        tgt = targets[p.name]
                        tgt.dest_bytes()[p.tensor_offset:p.tensor_offset + p.nbytes].copy_(
                            mapped.view(w.offset + p.chunk_offset, p.nbytes), non_blocking=True)
                        if tgt.check and last[p.name] == i:
                            flags.append((p.name, _finite(tgt.dest_elems())))
                    event = torch.cuda.Event()
                    event.record(stream)
                releases.append(ex.submit(_release, registry, event, address))
                held.discard(address)
                t = time.perf_counter()
                while len(releases) >= ahead:  # registered windows stay within ``windows_ahead`` in flight
                    releases.popleft().result()
                timing["wait_release"] += time.perf_counter() - t
                if i + ahead < len(windows):
                    start(i + ahead)
            t = time.perf_counter()
            while releases:
                releases.popleft().result()
            stream.synchronize()
            ok = _verdicts(flags)
            timing["finish"] = time.perf_counter() - t
            timing["registered_bytes"] = float(sum(s.nbytes for s in chosen))
            return timing, ok, len(windows), {s.name for s in chosen}
        except BaseException:
            for _, _, fut in pending:
                fut.cancel()
            wait_futures([f for _, _, f in pending] + list(releases))
            for _, address, fut in pending:
                if not fut.cancelled() and fut.exception() is None:
                    held.add(address)
            stream.synchronize()
            for address in held:
                try:
                    registry.unregister(address)
                except RegisterError:
                    log.exception("weights transfer: unregistering a window after a failed read")
            raise
        finally:
            for m in maps.values():
                m.close()

    def _run_cuda(self, chunks: list[Chunk], targets: Mapping[str, _Target], fds: Mapping[str, int],
                  device: torch.device, source: str) -> tuple[dict[str, float], dict[str, bool]]:
        pool = self._pinned()
        stream = self._stream(device)
        need_scratch = any(t.dest is None or t.cast for t in targets.values())
        scratch = self._device_scratch(device) if need_scratch else None
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
                    raise self._short(chunk, got, n, a)
            timing["wait_read"] += time.perf_counter() - t
            with torch.cuda.stream(stream):
                for p in chunk.pieces:
                    tgt = targets[p.name]
                    if tgt.dest is None and not tgt.check:
                        continue  # scanning: only what can be non-finite matters
                    host = buf.host[p.chunk_offset:p.chunk_offset + p.nbytes]
                    if tgt.dest is not None and not tgt.cast:
                        tgt.dest_bytes()[p.tensor_offset:p.tensor_offset + p.nbytes].copy_(host, non_blocking=True)
                        if tgt.check:
                            e0 = p.tensor_offset // tgt.dtype.itemsize
                            flags.append((p.name, _finite(tgt.dest_elems()[e0:e0 + p.nbytes // tgt.dtype.itemsize])))
                        continue
                    assert scratch is not None
                    raw = scratch[:p.nbytes]
                    raw.copy_(host, non_blocking=True)
                    src = raw.view(tgt.src.dtype)
                    if tgt.dest is not None:
                        e0 = p.tensor_offset // tgt.src.dtype.itemsize
                        out = tgt.dest_elems()[e0:e0 + src.numel()]
                        out.copy_(src)  # the cast, on the device
                    else:
                        out = src.to(tgt.dtype) if tgt.cast else src
                    if tgt.check:
                        flags.append((p.name, _finite(out)))
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
        ok = _verdicts(flags)
        timing["finish"] = time.perf_counter() - t
        return timing, ok

    def _run_cpu(self, chunks: list[Chunk], targets: Mapping[str, _Target],
                 fds: Mapping[str, int]) -> tuple[dict[str, float], dict[str, bool]]:
        def work(chunk: Chunk) -> list[tuple[str, bool]]:
            fd = fds[chunk.file]
            verdicts = []
            for p in chunk.pieces:
                tgt = targets[p.name]
                if tgt.dest is None and not tgt.check:
                    continue
                at = chunk.offset + p.chunk_offset
                if tgt.dest is not None and not tgt.cast:
                    got = _pread_full(fd, _bytes_view(tgt.dest_bytes())[p.tensor_offset:
                                                                                p.tensor_offset + p.nbytes], at)
                    if got != p.nbytes:
                        raise self._short(chunk, got, p.nbytes, p.chunk_offset)
                    e0 = p.tensor_offset // tgt.dtype.itemsize
                    out = tgt.dest_elems()[e0:e0 + p.nbytes // tgt.dtype.itemsize]
                else:
                    raw = torch.empty(p.nbytes, dtype=torch.uint8)
                    got = _pread_full(fd, _bytes_view(raw), at)
                    if got != p.nbytes:
                        raise self._short(chunk, got, p.nbytes, p.chunk_offset)
                    src = raw.view(tgt.src.dtype)
                    if tgt.dest is not None:
                        e0 = p.tensor_offset // tgt.src.dtype.itemsize
                        out = tgt.dest_elems()[e0:e0 + src.numel()]
                        out.copy_(src)
                    else:
                        out = src.to(tgt.dtype) if tgt.cast else src
                if tgt.check:
                    verdicts.append((p.name, _finite_host(out)))
            return verdicts

        ex = self._threads()
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
        for verdicts in results:
            for name, good in verdicts:
                ok[name] = ok.get(name, True) and good
        return {"wait_read": time.perf_counter() - t}, ok

    @staticmethod
    def _describe(tgt: _Target) -> str:
        """The validator's message for a tensor that failed the finiteness check (re-read on the host)."""
        s = tgt.src
        try:
            with open(s.file, "rb") as f:
                f.seek(s.offset)
                raw = bytearray(f.read(s.nbytes))
            original = torch.frombuffer(raw, dtype=torch.uint8).view(s.dtype).reshape(s.shape) if s.nbytes \
                else torch.empty(s.shape, dtype=s.dtype)
            cast = original if original.dtype == tgt.dtype else original.to(tgt.dtype)
            if not _needs_finite_check(original.dtype) or bool(torch.isfinite(cast).all()):
                return f"tensor {s.name!r}: NaN or Inf values on the device (the file changed while being read?)"
            return _finite_problem(s.name, original, cast)
        except (OSError, RuntimeError, ValueError) as e:
            return f"tensor {s.name!r}: NaN or Inf values (could not re-read it for details: {e})"


def _release(registry: HostRegistry, event: torch.cuda.Event, address: int) -> None:
    """Unregister a window once the copies out of it are done (on a reader thread)."""
    event.synchronize()
    registry.unregister(address)


# --------------------------------------------------------------------------- checkpoints


def read_checkpoint_into(candidate: CheckpointCandidate, metas: Mapping[str, TensorMeta],
                         specs: Mapping[str, WeightSpec], names: Sequence[str],
                         dest: Mapping[str, torch.Tensor] | None, *, reader: FastReader,
                         check_finite: bool = True, device: torch.device | str | None = None) -> ReadStats:
    """Read ``names`` of a safetensors checkpoint into ``dest`` (or only check them, ``dest=None``).

    Fails with ``reason="changed_during_read"`` when a file differs from its fingerprint (size,
    mtime, inode) before or after the read, like :func:`~serving.weights.checkpoint.read_tensors`.
    """
    if candidate.format not in ("safetensors", "sharded"):
        raise ConfigError(f"{candidate.path}: the fast path reads safetensors only, not {candidate.format!r}")
    baseline = _baseline(candidate)
    _verify_unchanged(candidate, baseline, "since it was detected")
    sources = tensor_sources(metas, names)
    source = str(candidate.path)
    if dest is None:
        stats = reader.scan(sources, specs, device or "cpu", source=source)
    else:
        stats = reader.read_into(sources, specs, dest, check_finite=check_finite, source=source)
    _verify_unchanged(candidate, baseline, "while it was being read")
    return stats
