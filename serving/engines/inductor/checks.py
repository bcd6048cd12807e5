"""What the Inductor engine checks: the device (Triton on CUDA), the batch sizes it compiles for, and that the
compiled code follows a refit of every weight (:func:`refit_check`, empirically against the eager module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree

from serving.engines.base import build_device
from serving.engines.export import make_module
from serving.errors import ConfigError, EngineBuildError, EngineUnavailableError
from serving.specs import BuildSpec

if TYPE_CHECKING:
    from serving.engines.inductor.slot import InductorSlot


def inductor_device(spec: BuildSpec) -> torch.device:
    """The device of a build (:func:`~serving.engines.base.build_device`); on CUDA, Triton must work too."""
    device = build_device(spec, "Inductor engine")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise EngineUnavailableError(
                "Inductor engine: Inductor generates Triton kernels on CUDA, but the 'triton' package is "
                "missing or does not work with this GPU; install the triton version this torch pins "
                "(pip install triton) or choose engine 'eager'")
    return device


def cuda_graphs_of(spec: BuildSpec) -> bool:
    """The ``cuda_graphs`` option of a build (only on CUDA)."""
    on = bool(spec.option("cuda_graphs", False))
    if on and not spec.device.startswith("cuda"):
        raise ConfigError(f"cuda_graphs: true needs a CUDA device; this model instance runs on {spec.device!r}")
    return on


def warmup_batches(max_batch: int) -> tuple[int, ...]:
    """Batch 1 (its own, specialized graph), 2 and ``max_batch`` (the dynamic graph)."""
    return tuple(sorted({1, min(2, max_batch), max_batch}))


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a CUDA graph: powers of two below ``max_batch``, and ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch size {n} is larger than the largest CUDA graph ({buckets[-1]})")


def random_inputs(spec: BuildSpec, n: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """A batch of ``n`` random inputs (small ids for integer inputs)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in spec.inputs:
        shape = (n, *s.shape)
        if s.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(device=device, dtype=s.dtype))
        else:
            out.append(torch.randint(0, 4, shape, generator=gen).to(device=device, dtype=s.dtype))
    return out


def probe_weights(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A different, plausible value for every floating tensor (others unchanged). Pure but for RNG use.

    Tensors that are never negative (norm scales, running variances, zero-initialized biases) stay
    non-negative and become non-zero; the others get noise on their own scale.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not t.is_floating_point() or not t.numel():
            out[name] = t.detach().clone()
            continue
        host = t.detach().float().cpu()
        noise = torch.rand(host.shape, generator=gen)
        if bool((host >= 0).all()):
            new = host * (0.5 + noise) + 0.1 * torch.rand(host.shape, generator=gen)
        else:
            scale = float(host.std()) if host.numel() > 1 else float(host.abs().max())
            new = host + max(scale, 1e-2) * (2 * noise - 1)
        out[name] = new.to(device=t.device, dtype=t.dtype)
    return out


def refit_check(slot: InductorSlot, spec: BuildSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an engine whose compiled code does not follow a refit of every weight.

    ``slot`` holds ``state`` and is warmed up. It is refitted to :func:`probe_weights` and its output
    compared with the eager module on the same weights, at batch 1 and ``max_batch`` (both graphs).
    On a mismatch each tensor is tried alone, to name the ones that are baked in.
    """
    probe = probe_weights(state, seed=1)
    base = {k: v.detach().clone() for k, v in state.items()}  # ``state`` may be the slot's own tensors
    reference = make_module(spec, slot.device)
    reference.load_state_dict(probe, strict=False)  # tied aliases follow the name they share storage with
    slot.refit(probe)
    inputs = [random_inputs(spec, n, slot.device, seed=n) for n in sorted({1, spec.max_batch})]
    mismatches = [p for xs in inputs if (p := mismatch(slot.run(xs), eager(reference, xs)))]
    if not mismatches:
        return
    baked = _baked(slot, reference, base, probe, inputs[-1])
    raise EngineBuildError(
        f"Inductor engine for {spec.factory}: the compiled code does not follow a refit "
        f"({'; '.join(mismatches)}); weights baked into the code: {baked or 'not narrowed to single tensors'}. "
        "A weight-stripped engine must read every weight as a graph input: check that nothing turns them into "
        "constants (torch._inductor.config.freezing, a forward that reads a weight as a Python number)")


def _baked(slot: InductorSlot, reference: torch.nn.Module, base: Mapping[str, torch.Tensor],
           probe: Mapping[str, torch.Tensor], xs: Sequence[torch.Tensor]) -> list[str]:
    """The floating tensors whose refit alone, from ``base``, leaves the compiled output where it was (baked into
    the code)."""
    baked = []
    for name in (n for n, t in base.items() if t.is_floating_point()):
        slot.refit(base)
        reference.load_state_dict(base, strict=False)
        before = slot.run(xs)
        slot.refit({name: probe[name]})
        reference.load_state_dict({**base, name: probe[name]}, strict=False)
        after, expected = slot.run(xs), eager(reference, xs)
        if mismatch(after, expected) and not mismatch(after, before):
            baked.append(name)
    return baked


def eager(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The eager module's outputs, flattened as the engine returns them."""
    with torch.no_grad():
        return list(pytree.tree_leaves(module(*inputs)))


def tolerance(t: torch.Tensor) -> float:
    """Relative tolerance of a comparison with eager: float32 keeps about 1e-4 over a network's reductions;
    half precision, and float32 on a GPU whose matmuls or cuDNN convolutions use TF32 (cuDNN's default,
    for eager and compiled code alike, with different roundings), about 2e-2.

    The flags are read, never changed: TorchDynamo guards on them, so a check run under other flags would
    compile, and test, other code than serving runs.
    """
    tf32 = t.is_cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    return 1e-4 if t.dtype in (torch.float32, torch.float64) and not tf32 else 2e-2


def mismatch(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> str:
    """'' when equal within :func:`tolerance` times the output's scale, else how far off.

    A weight baked into the code gives outputs of another model: off by a good part of their scale.
    Rounding (another reduction order, fused kernels) stays well below that even when a deep network's
    outputs are large.
    """
    if len(got) != len(expected):
        return f"{len(got)} outputs, eager has {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, eager {tuple(b.shape)}"
        scale = max(1.0, b.float().abs().max().item()) if b.numel() else 1.0
        err = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
        if not err <= tolerance(a) * scale:  # NaN fails too
            return (f"output {i} of batch {b.shape[0] if b.dim() else 0} differs from eager by {err:.3g} "
                    f"(outputs up to {scale:.3g})")
    return ""


__all__ = ["bucket_for", "cuda_graphs_of", "eager", "graph_buckets", "inductor_device", "mismatch", "probe_weights",
           "random_inputs", "refit_check", "tolerance", "warmup_batches"]
