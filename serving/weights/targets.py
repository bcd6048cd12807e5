"""What the fast path's readers fill and check: one :class:`Target` per tensor, the finiteness flags computed
where the bytes land (on the device for CUDA destinations), and the account of a read (:class:`ReadStats`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from serving.weights.plan import TensorSource
from serving.weights.validate import CASTABLE_FLOATS, _all_finite, _finite_problem


@dataclass(frozen=True)
class ReadStats:
    """What one read did, and where its time went."""

    bytes: int
    seconds: float
    chunks: int
    device: str
    #: time the dispatcher waited for file reads (I/O or page-cache bound when it dominates)
    wait_read_s: float = 0.0
    #: time the dispatcher waited for a pinned buffer or a scratch slot to come back from the GPU
    wait_copy_s: float = 0.0
    #: the final synchronization and the finiteness verdicts
    finish_s: float = 0.0
    #: tensors cast on the way (checkpoint dtype != engine dtype)
    cast: tuple[str, ...] = ()
    #: the transfer that carried the bytes ("kvikio", "pinned" or "cpu")
    transfer: str = ""
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class Target:
    """One tensor's destination (or None when only scanning) and how to fill it."""

    index: int
    src: TensorSource
    dtype: torch.dtype  # the engine's dtype
    dest: torch.Tensor | None
    check: bool

    @property
    def cast(self) -> bool:
        return self.src.dtype != self.dtype

    @property
    def direct(self) -> bool:
        """The file's bytes can go straight into the destination (no cast, not a scan)."""
        return self.dest is not None and not self.cast

    @property
    def skip(self) -> bool:
        """Scanning a tensor that cannot be non-finite: nothing to do with its bytes."""
        return self.dest is None and not self.check

    def dest_elems(self) -> torch.Tensor:
        assert self.dest is not None
        return self.dest.detach().view(-1)

    def dest_bytes(self) -> torch.Tensor:
        return self.dest_elems().view(torch.uint8)

    def take(self, raw: torch.Tensor, tensor_offset: int) -> torch.Tensor:
        """Put ``raw`` (this tensor's bytes from ``tensor_offset``, in the checkpoint's dtype, on the
        destination's device) where it belongs, cast; returns what to check (the cast values)."""
        if raw.storage_offset() % self.src.dtype.itemsize:  # a file that does not align its tensors
            raw = raw.clone()
        src = raw.view(self.src.dtype)
        if self.dest is not None:
            e0 = tensor_offset // self.src.dtype.itemsize
            out = self.dest_elems()[e0:e0 + src.numel()]
            out.copy_(src)  # the cast, on the destination's device
            return out
        return src.to(self.dtype) if self.cast else src

    def written(self, tensor_offset: int, nbytes: int) -> torch.Tensor:
        """The destination elements of bytes ``tensor_offset..+nbytes`` (a direct read just filled them)."""
        e0 = tensor_offset // self.dtype.itemsize
        return self.dest_elems()[e0:e0 + nbytes // self.dtype.itemsize]


def make_targets(sources: Sequence[TensorSource], dtypes: Mapping[str, torch.dtype],
                 dest: Mapping[str, torch.Tensor] | None, check_finite: bool) -> dict[str, Target]:
    """One target per source, in the engine's dtype; checked when asked and the dtype can hold NaN/Inf."""
    return {s.name: Target(i, s, dtypes[s.name], None if dest is None else dest[s.name],
                           check_finite and needs_finite_check(dtypes[s.name]))
            for i, s in enumerate(sources)}


def needs_finite_check(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def finite(x: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on x's device, computed without a host synchronization."""
    if x.dtype not in CASTABLE_FLOATS and not x.is_complex():
        x = x.float()  # float8 and friends: isfinite is not implemented for every one of them
    return torch.isfinite(x).all()


def finite_host(x: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no NaN/Inf: the validator's sum test (one read of the piece, no mask; element by
    element only when the sum overflows), where ``isfinite(x).all()`` writes and reads a mask as large as the piece."""
    if x.dtype not in CASTABLE_FLOATS and not x.is_complex():
        x = x.float()
    return _all_finite(x)


def verdicts(flags: Sequence[tuple[str, torch.Tensor]]) -> dict[str, bool]:
    """Per tensor, whether all its finiteness flags (0-d tensors) are true: one host synchronization."""
    ok: dict[str, bool] = {}
    if flags:
        got = torch.stack([f for _, f in flags]).cpu().tolist()
        for (name, _), good in zip(flags, got, strict=True):
            ok[name] = ok.get(name, True) and bool(good)
    return ok


def describe_nonfinite(tgt: Target) -> str:
    """The validator's message for a tensor that failed the finiteness check (re-read on the host)."""
    s = tgt.src
    try:
        with open(s.file, "rb") as f:
            f.seek(s.offset)
            raw = bytearray(f.read(s.nbytes))
        original = torch.frombuffer(raw, dtype=torch.uint8).view(s.dtype).reshape(s.shape) if s.nbytes \
            else torch.empty(s.shape, dtype=s.dtype)
        cast = original if original.dtype == tgt.dtype else original.to(tgt.dtype)
        if not needs_finite_check(original.dtype) or bool(torch.isfinite(cast).all()):
            return f"tensor {s.name!r}: NaN or Inf values on the device (the file changed while being read?)"
        return _finite_problem(s.name, original, cast)
    except (OSError, RuntimeError, ValueError) as e:
        return f"tensor {s.name!r}: NaN or Inf values (could not re-read it for details: {e})"
