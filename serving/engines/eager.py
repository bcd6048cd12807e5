"""PyTorch eager engine: the model module itself, on CPU or CUDA. Runs everywhere."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from serving.engines.base import BuildInfo, Engine, WeightSlot, build_device, weight_problems
from serving.engines.export import make_module
from serving.errors import NotReadyError, ValidationError
from serving.specs import BuildSpec, WeightSpec, specs_with_ties

if TYPE_CHECKING:
    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics


def _to_list(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    if isinstance(out, dict):
        return [t for t in out.values() if isinstance(t, torch.Tensor)]
    raise TypeError(f"model returned {type(out).__name__}; expected tensors")


def module_weight_specs(module: torch.nn.Module) -> dict[str, WeightSpec]:
    """Every state-dict tensor of ``module`` as a :class:`WeightSpec`; tied parameters are one spec, their
    other names its aliases."""
    return specs_with_ties(module.state_dict(keep_vars=True))


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Whether ``b`` is ``a`` (the same memory, viewed the same way)."""
    return (a is not None and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


class EagerSlot(WeightSlot):
    """A module of its own; refit assigns our tensors as its parameters (no copy)."""

    def __init__(self, module: torch.nn.Module, device: torch.device, specs: Mapping[str, WeightSpec]) -> None:
        self.module = module
        self.device = device
        self.specs = specs
        self.names = frozenset(specs)
        #: spec name -> its tied aliases: a refit assigns the one tensor to every name of the group
        self.aliases = {n: s.aliases for n, s in specs.items() if s.aliases}
        self.loaded = False

    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        out = {k: v.to(self.device, non_blocking=non_blocking) for k, v in weights.items()}
        if non_blocking:
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Assign ``weights`` as the module's tensors (checked first: nothing is assigned when one is wrong)."""
        problems = weight_problems(self.specs, weights, self.device, full=not self.loaded)
        if problems:
            raise ValidationError("refit of the eager engine", problems)
        state = dict(weights)
        for name, aliases in self.aliases.items():
            if name in state:
                state.update(dict.fromkeys(aliases, state[name]))
        # the fast path writes into the module's own tensors (buffers()): those are in place already
        current = self.module.state_dict()
        state = {k: v for k, v in state.items() if not _same_tensor(current.get(k), v)}
        if state:
            self.module.load_state_dict(state, strict=False, assign=True)
        self.loaded = True

    def buffers(self) -> Mapping[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items() if k in self.names}

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.loaded:
            raise NotReadyError("eager engine: no weights installed yet")
        with torch.inference_mode():
            return _to_list(self.module(*[x.to(self.device) for x in inputs]))


class EagerEngine(Engine):
    """The factory's module, in eval mode, on ``spec.device``. Nothing to compile, nothing to cache."""

    kind = "eager"

    def __init__(self, spec: BuildSpec, device: torch.device, specs: dict[str, WeightSpec],
                 build_info: BuildInfo) -> None:
        super().__init__(device, build_info)
        self.spec = spec
        self._specs = specs

    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None = None,
              metrics: HotswapMetrics | None = None) -> EagerEngine:
        """The factory's module on the device; ``cache`` is not used (there is nothing compiled to keep)."""
        t0 = time.perf_counter()
        device = build_device(spec, "eager engine")
        module = make_module(spec, device)
        specs = module_weight_specs(module)
        info = BuildInfo("bypass", time.perf_counter() - t0, None, "eager modules are not cached")
        return cls(spec, device, specs, info)

    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self._specs

    def new_slot(self) -> EagerSlot:
        return EagerSlot(make_module(self.spec, self.device), self.device, self._specs)
