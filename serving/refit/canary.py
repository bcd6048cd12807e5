"""The canary: checks run on freshly refitted weights before they serve."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from serving.choices import CANARY_MODES
from serving.engines.base import WeightSlot
from serving.errors import CanaryError, ConfigError
from serving.refit.report import StagedWeights
from serving.specs import TensorSpec


@dataclass(frozen=True)
class CanaryConfig:
    """Checks run on freshly refitted weights before they serve.

    ``finite``: outputs are finite and not all zero (a stripped engine that was never
    refitted returns zeros). ``reference``: additionally equal, within ``atol``/``rtol``, to
    the eager module (``reference_factory``) run with the same weights on the same input.
    """

    mode: str = "finite"
    atol: float = 1e-3
    rtol: float = 1e-3
    batch: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in CANARY_MODES:
            raise ConfigError(f"canary mode {self.mode!r}: choose one of {CANARY_MODES}")


def canary_inputs(inputs: Sequence[TensorSpec], batch: int, seed: int) -> list[torch.Tensor]:
    """Deterministic inputs for the canary: normal floats, small non-negative ints (valid ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in inputs:
        shape = (batch, *spec.shape)
        if spec.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(spec.dtype))
        elif spec.dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 4, shape, generator=gen).to(spec.dtype))
    return out


def check_canary(outputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor] | None,
                 config: CanaryConfig, version: str) -> None:
    """Raise :class:`CanaryError` naming what is off. Pure."""
    problems = []
    for i, out in enumerate(outputs):
        out = out.detach().float().cpu()
        if not torch.isfinite(out).all():
            problems.append(f"output {i} has NaN/Inf")
        elif out.numel() and not out.abs().sum().item():
            problems.append(f"output {i} is all zeros (weights not applied?)")
    if expected is not None:
        if len(expected) != len(outputs):
            problems.append(f"engine gave {len(outputs)} outputs, reference {len(expected)}")
        for i, (out, ref) in enumerate(zip(outputs, expected, strict=False)):
            o, r = out.detach().float().cpu(), ref.detach().float().cpu()
            if o.shape != r.shape:
                problems.append(f"output {i}: shape {tuple(o.shape)} vs reference {tuple(r.shape)}")
            elif not torch.allclose(o, r, atol=config.atol, rtol=config.rtol):
                err = (o - r).abs().max().item()
                problems.append(f"output {i}: max abs diff {err:.3g} from the eager reference "
                                f"(atol={config.atol}, rtol={config.rtol})")
    if problems:
        raise CanaryError(f"canary failed for version {version!r}: " + "; ".join(problems))


class Canary:
    """Runs the configured check on a slot; builds the reference module once, on first use."""

    def __init__(self, config: CanaryConfig | None, input_specs: Sequence[TensorSpec] = (),
                 reference_factory: Callable[[], torch.nn.Module] | None = None) -> None:
        self.config = config or CanaryConfig(mode="off")
        if self.config.mode == "reference" and reference_factory is None:
            raise ConfigError("canary mode 'reference' needs a reference_factory (the eager model)")
        if self.config.mode != "off" and not input_specs:
            raise ConfigError("a canary needs the model's input specs")
        self.inputs = (canary_inputs(input_specs, self.config.batch, self.config.seed)
                       if self.config.mode != "off" else [])
        self._reference_factory = reference_factory
        self._reference: torch.nn.Module | None = None

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    def check(self, slot: WeightSlot, staged: StagedWeights) -> None:
        """Run ``slot`` on the canary inputs; raise :class:`CanaryError` when its outputs are off."""
        outputs = slot.run(self.inputs)
        expected = self._reference_outputs(staged) if self.config.mode == "reference" else None
        check_canary(outputs, expected, self.config, staged.version)

    def _reference_outputs(self, staged: StagedWeights) -> list[torch.Tensor]:
        if self._reference is None:
            assert self._reference_factory is not None
            self._reference = self._reference_factory().eval()
        ref = self._reference
        device = next((p.device for p in ref.parameters()), torch.device("cpu"))
        weights = {k: v.to(device) for k, v in staged.tensors.items()}
        with torch.inference_mode():
            out = torch.func.functional_call(ref, weights, tuple(x.to(device) for x in self.inputs))
        # a library's output object (transformers' ModelOutput is a dict) flattens to its tensors, as the engines do
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
