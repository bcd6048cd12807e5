"""How checkpoint bytes reach the destination tensors: the fast path's settings and the choice of transfer.
Pure. The choices, defaults and bounds are :mod:`serving.choices`'s, which the settings table reads too.

* ``kvikio``: KvikIO's C++ threads ``pread`` each tensor's byte range straight into its destination tensor
  (through their own pinned bounce buffers in compat mode, disk to GPU with GPUDirect Storage where the host
  has it) (:mod:`serving.weights.kvikio_reader`);
* ``pinned``: our reader threads fill a ring of pinned buffers that a side stream copies to the device
  (:mod:`serving.weights.ring`), the fallback when KvikIO is not installed or does not work;
* ``auto``: ``kvikio`` when it imports and reads here, otherwise ``pinned``; the log says which and why.

CPU destinations are read by the reader threads straight into their memory (through KvikIO only when
``kvikio`` is asked for by name).
Why KvikIO first, and how the defaults are compared: docs/gpu.md ("The weight path").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.choices import (
    READ_BYTES,
    READ_BYTES_BOUNDS,
    READER_THREADS,
    READER_THREADS_BOUNDS,
    TASK_BYTES,
    TASK_BYTES_BOUNDS,
    TRANSFER,
    TRANSFERS,
)
from serving.errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True)
class FastPathConfig:
    """Sizes of the fast path's readers.

    The defaults are meant to put serving first (requests served during a load close to their steady
    latency, then speed); ``bench/loaders.py`` compares them with other settings (docs/gpu.md; figures in
    docs/benchmarks.md). Threads, read and task sizes are settings, with defaults and bounds from
    :mod:`serving.choices`.
    """

    #: reader threads: KvikIO's thread pool, or the pinned ring's threads (setting ``weights_reader_threads``)
    threads: int = READER_THREADS
    #: pinned ring: buffers in the pool (CUDA), at least 2 so that reading and copying overlap
    buffers: int = 6
    #: pinned ring: size of each pinned buffer; both transfers: the device scratch chunk for casts and scans
    buffer_bytes: int = 64 * MiB
    #: pinned ring and CPU: bytes per ``os.preadv`` call (setting ``weights_read_bytes``)
    read_bytes: int = READ_BYTES
    #: KvikIO: bytes per task, the unit its threads read (setting ``weights_task_bytes``)
    task_bytes: int = TASK_BYTES
    #: how bytes reach a CUDA destination (:data:`serving.choices.TRANSFERS`; setting ``weights_transfer``)
    transfer: str = TRANSFER

    def __post_init__(self) -> None:
        problems = []
        if self.transfer not in TRANSFERS:
            problems.append(f"transfer={self.transfer!r} (one of {', '.join(TRANSFERS)})")
        problems += [f"threads={self.threads} ({p})" for p in READER_THREADS_BOUNDS.problems(self.threads)]
        if self.buffers < 2:
            problems.append(f"buffers={self.buffers} (need >= 2 to overlap reads and copies)")
        if self.buffer_bytes < MiB or self.buffer_bytes % 64:
            problems.append(f"buffer_bytes={self.buffer_bytes} (need >= 1 MiB and a multiple of 64)")
        problems += [f"read_bytes={self.read_bytes} ({p})" for p in READ_BYTES_BOUNDS.problems(self.read_bytes)]
        problems += [f"task_bytes={self.task_bytes} ({p})" for p in TASK_BYTES_BOUNDS.problems(self.task_bytes)]
        if problems:
            raise ConfigError("FastPathConfig: " + ", ".join(problems))


@dataclass(frozen=True)
class KvikIOStatus:
    """Whether KvikIO can read here: it imports, and a read of a real checkpoint file came back right."""

    ok: bool
    #: why not (when not ``ok``), or what was checked
    reason: str
    version: str = ""
    #: reads go disk -> GPU through GPUDirect Storage (False: compat mode, through pinned bounce buffers)
    gds: bool = False
    #: why GDS is or is not used, as KvikIO reports it
    gds_reason: str = ""

    def describe(self) -> str:
        gds = "GDS used" if self.gds else "GDS not used"
        return f"KvikIO {self.version}, {gds}" + (f" ({self.gds_reason})" if self.gds_reason else "")


@dataclass(frozen=True)
class TransferChoice:
    """The transfer a reader uses for one device, and why (the log line)."""

    kind: str  # "kvikio" | "pinned" | "cpu"
    reason: str
    gds: bool = False


def needs_kvikio(setting: str, device: torch.device | str) -> bool:
    """Whether choosing the transfer for ``device`` under ``setting`` needs KvikIO's status."""
    return setting == "kvikio" or (setting == "auto" and torch.device(device).type == "cuda")


def resolve_transfer(setting: str, device: torch.device | str, kvikio: KvikIOStatus | None) -> TransferChoice:
    """Which transfer reads into ``device`` under ``setting``, given what KvikIO can do here (``None``: not
    asked, which only :func:`needs_kvikio` allows). An explicit ``kvikio`` that cannot work is a
    :class:`~serving.errors.ConfigError` naming why and the fix, never a silent fallback.

    ``auto`` and ``pinned`` read CPU destinations with our threads; an explicit ``kvikio`` reads them through
    KvikIO too (its ``pread`` fills host memory as well as device memory).
    """
    if setting not in TRANSFERS:
        raise ConfigError(f"weights_transfer={setting!r}: expected one of {', '.join(TRANSFERS)}")
    device = torch.device(device)
    if not needs_kvikio(setting, device):
        if device.type != "cuda":
            return TransferChoice("cpu", f"{device.type} destinations: the reader threads read straight into "
                                         f"them (weights_transfer is {setting!r})")
        return TransferChoice("pinned", "weights_transfer is 'pinned'")
    if kvikio is None:
        raise ValueError(f"weights_transfer={setting!r} on {device} needs KvikIO's status")
    if kvikio.ok:
        why = "weights_transfer is 'kvikio'" if setting == "kvikio" else "auto: KvikIO imports and reads here"
        return TransferChoice("kvikio", f"{why}; {kvikio.describe()}", gds=kvikio.gds)
    if setting == "kvikio":
        raise ConfigError(f"weights_transfer 'kvikio': KvikIO cannot read here: {kvikio.reason}; install the GPU "
                          "extra that matches torch's CUDA (pip install 'trt-hotswap[gpu-cu13]' for CUDA 13, "
                          "[gpu-cu12] for CUDA 12; docs/gpu.md), or set weights_transfer to 'auto' or 'pinned'")
    return TransferChoice("pinned", f"auto: KvikIO cannot read here ({kvikio.reason}); the pinned ring instead")
