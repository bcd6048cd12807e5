"""Random but valid state dicts for any factory: smoke tests of a deployment, tests, benchmarks."""

from __future__ import annotations

import torch

from serving.specs import tie_groups


def random_state_dict(module: torch.nn.Module, seed: int, *, scale: float = 0.5,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded normal values for every floating tensor of ``module.state_dict()``.

    Variances (``running_var``) are kept positive so BatchNorm stays finite; integer buffers
    (``num_batches_tracked``) are copied. Same module and seed -> the same tensors. Tied names (one
    tensor, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) get equal values.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    state = module.state_dict()
    tied = {n: group[0] for group in tie_groups(module.state_dict(keep_vars=True)) for n in group[1:]}
    for name, value in state.items():
        if name in tied:
            out[name] = out[tied[name]].clone()  # equal values; own memory, as safetensors files need
            continue
        if not value.is_floating_point():
            out[name] = value.detach().clone()
            continue
        t = torch.randn(value.shape, generator=gen, dtype=torch.float32) * scale
        if name.endswith("running_var"):
            t = t.abs() + 0.5
        out[name] = t.to(dtype or value.dtype).contiguous()
    return out
