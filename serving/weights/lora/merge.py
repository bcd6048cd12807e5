"""The merge itself: ``W = W0 + scale * delta(A, B)`` into base tensors, as PEFT's ``merge()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serving.specs import dtype_name
from serving.weights.lora.adapter import LoraAdapter, LoraModule
from serving.weights.lora.config import lora_invalid


def lora_delta(m: LoraModule, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * B @ A`` laid out like the base weight (without the server's extra scale)."""
    a = m.a.to(device=device, dtype=dtype)
    b = m.b.to(device=device, dtype=dtype)
    if m.kind == "conv":
        d = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    else:
        d = b @ a
        if m.kind == "embedding" or m.transposed:
            d = d.T
    return d * m.scale


def merge_lora(base: Mapping[str, torch.Tensor], adapter: LoraAdapter, *, scale: float = 1.0,
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``base`` with the adapter merged at ``scale`` (times each module's alpha/r), computed on ``device``.

    Returns a new dict: the touched tensors are new (on ``device``, in the base tensors' dtypes),
    every other entry is the very tensor object of ``base``. The sum is computed in float32
    (float64 for float64 weights) and cast back once. Raises :class:`ValidationError`
    (``reason="lora_invalid"``) if a merged weight is not finite (e.g. overflows float16).
    """
    out = dict(base)
    problems: list[str] = []
    for m in adapter.modules:
        w0 = base[m.weight]
        dev = device if device is not None else w0.device
        compute = torch.float64 if w0.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            merged = w0.to(device=dev, dtype=compute) + lora_delta(m, device=dev, dtype=compute) * scale
            w = merged.to(w0.dtype)
        if not bool(torch.isfinite(w).all()):
            problems.append(f"module {m.module!r}: merged weight {m.weight!r} has NaN/Inf values "
                            f"(adapter too large for {dtype_name(w0.dtype)}?)")
        out[m.weight] = w
    for name, t in adapter.replaced.items():
        w0 = base[name]
        dev = device if device is not None else w0.device
        out[name] = t.to(device=dev, dtype=w0.dtype if t.is_floating_point() else t.dtype).clone()
    if problems:
        raise lora_invalid(adapter.source or adapter.name, problems)
    return out
