"""The fast weight path: safetensors bytes straight into preallocated destination tensors.

A :class:`FastReader` reads the tensors of a checkpoint (single file or shards) into the tensors a slot will
run with, checks NaN/Inf where the bytes land (on the device for CUDA destinations), and keeps what it
allocated (device scratch, streams, threads) from one refit to the next until :meth:`FastReader.close`.
Which transfer carries the bytes to a device is chosen once per device (:func:`~serving.weights.transfer.
resolve_transfer`, logged with the reason and whether GPUDirect Storage is used):

* ``kvikio`` (:mod:`serving.weights.kvikio_reader`): KvikIO's threads read each tensor straight into its
  destination; casts and scans go through a bounded device scratch;
* ``pinned`` (:mod:`serving.weights.ring`): our threads fill a ring of pinned buffers copied on a side stream;
* CPU destinations: our threads read straight into their memory.

This module only fills the tensors it is given: which tensors those are (a standby slot's, or the live ones
after a read that only checks), what memory each refit strategy holds and why: ``serving/refit/strategies.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from serving.errors import ConfigError, ValidationError, reading
from serving.specs import WeightSpec
from serving.weights.checkpoint import CheckpointCandidate, _baseline, _verify_unchanged
from serving.weights.kvikio_reader import KvikIOReader, load_kvikio, probe
from serving.weights.plan import (
    Chunk,
    Piece,
    TensorSource,
    allocate,
    data_start,
    destination_problems,
    plan_chunks,
    tensor_sources,
)
from serving.weights.ring import RingReader
from serving.weights.safetensors_header import TensorMeta
from serving.weights.targets import ReadStats, describe_nonfinite, make_targets
from serving.weights.transfer import (
    FastPathConfig,
    KvikIOStatus,
    TransferChoice,
    needs_kvikio,
    resolve_transfer,
)

log = logging.getLogger(__name__)

__all__ = [  # the fast path's public names, wherever they are defined
    "Chunk", "FastPathConfig", "FastReader", "Piece", "ReadStats", "TensorSource", "allocate",
    "data_start", "destination_problems", "plan_chunks", "read_checkpoint_into", "tensor_sources",
]

#: what a reader calls to get the ``kvikio`` module: (module or None, why not)
KvikIOLoader = Callable[[], tuple[Any | None, str]]


class FastReader:
    """Reads safetensors tensors into destination tensors; reusable, one read at a time.

    ``kvikio_loader`` returns the ``kvikio`` module (or None and why; default :func:`load_kvikio`); tests
    pass a fake of the library.
    """

    def __init__(self, config: FastPathConfig | None = None, *, kvikio_loader: KvikIOLoader | None = None) -> None:
        self.config = config or FastPathConfig()
        self._lock = threading.Lock()
        self._ring = RingReader(self.config)
        self._kvikio: KvikIOReader | None = None
        self._load_kvikio = kvikio_loader
        #: the transfer chosen for each device read into so far
        self.choices: dict[torch.device, TransferChoice] = {}

    def close(self) -> None:
        """Stop the threads (ours and the ones KvikIO started for us); free the pinned pool and the scratch."""
        with self._lock:
            self._ring.close()
            if self._kvikio is not None:
                self._kvikio.close()
                self._kvikio = None
            self.choices.clear()

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
        """Read and check every tensor (NaN/Inf, cast overflow) without keeping it, through a bounded scratch.

        The in-place strategy calls this off the serving path, before it holds requests.
        """
        return self._run(sources, specs, None, torch.device(device), True, source)

    # -- implementation ---------------------------------------------------------

    def _choose(self, device: torch.device, file: str) -> TransferChoice:
        """The transfer for ``device`` (chosen on its first read, logged, then kept)."""
        if device in self.choices:
            return self.choices[device]
        status: KvikIOStatus | None = None
        module = None
        if needs_kvikio(self.config.transfer, device):
            module, why = (self._load_kvikio or load_kvikio)()
            status = probe(module, file, device) if module is not None else KvikIOStatus(False, why)
        choice = resolve_transfer(self.config.transfer, device, status)
        if choice.kind == "kvikio":
            if self._kvikio is None:
                self._kvikio = KvikIOReader(self.config, module)
            how = f"{self.config.threads} threads, {_size(self.config.task_bytes)} tasks"
        elif choice.kind == "pinned":
            how = f"{self.config.threads} threads, {self.config.buffers} x {_size(self.config.buffer_bytes)} buffers"
        else:
            how = f"{self.config.threads} threads"
        level = logging.WARNING if status is not None and not status.ok and module is not None else logging.INFO
        log.log(level, "weights transfer to %s: %s (%s; %s)", device, choice.kind, choice.reason, how)
        self.choices[device] = choice
        return choice

    def _run(self, sources: Sequence[TensorSource], specs: Mapping[str, WeightSpec],
             dest: Mapping[str, torch.Tensor] | None, device: torch.device, check_finite: bool,
             source: str) -> ReadStats:
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{source}: the fast path reads into cpu or cuda tensors, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        targets = make_targets(sources, {n: specs[n].dtype for n in (s.name for s in sources)}, dest, check_finite)
        with self._lock:
            t0 = time.perf_counter()
            fds: dict[str, int] = {}
            kind = ""
            timing: dict[str, float] = {}
            ok: dict[str, bool] = {}
            count = 0
            try:
                with reading(source, gone="deleted before it was read"):
                    for s in sources:
                        if s.file not in fds:
                            fds[s.file] = os.open(s.file, os.O_RDONLY)
                    sizes = {f: os.fstat(fd).st_size for f, fd in fds.items()}
                if sources:
                    kind = self._choose(device, sources[0].file).kind
                    if kind == "kvikio":
                        assert self._kvikio is not None
                        timing, ok, count = self._kvikio.run(sources, targets, sizes, device)
                    elif kind == "pinned":
                        timing, ok, count = self._ring.run_cuda(sources, targets, fds, device)
                    else:
                        timing, ok, count = self._ring.run_cpu(sources, targets, fds)
            finally:
                for fd in fds.values():
                    os.close(fd)
            bad = sorted((t for t in targets.values() if t.check and not ok.get(t.src.name, True)),
                         key=lambda t: t.index)
            if bad:
                raise ValidationError(source, [describe_nonfinite(t) for t in bad])
            seconds = time.perf_counter() - t0
        return ReadStats(
            bytes=sum(s.nbytes for s in sources), seconds=seconds, chunks=count, device=str(device),
            wait_read_s=timing.get("wait_read", 0.0), wait_copy_s=timing.get("wait_copy", 0.0),
            finish_s=timing.get("finish", 0.0), cast=tuple(n for n, t in targets.items() if t.cast), transfer=kind,
            extra={k: v for k, v in timing.items() if k not in ("wait_read", "wait_copy", "finish")},
        )


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes >> 10} KiB"


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
