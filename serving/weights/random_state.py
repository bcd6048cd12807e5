"""Random but valid state dicts for any factory: smoke tests of a deployment, tests, benchmarks."""

from __future__ import annotations

import torch


def random_state_dict(module: torch.nn.Module, seed: int, *, scale: float = 0.5,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded normal values for every floating tensor of ``module.state_dict()``.

    Variances (``running_var``) are kept positive so BatchNorm stays finite; integer buffers
    (``num_batches_tracked``) are copied. Same module and seed -> the same tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if not value.is_floating_point():
            out[name] = value.detach().clone()
            continue
        t = torch.randn(value.shape, generator=gen, dtype=torch.float32) * scale
        if name.endswith("running_var"):
            t = t.abs() + 0.5
        out[name] = t.to(dtype or value.dtype).contiguous()
    return out
