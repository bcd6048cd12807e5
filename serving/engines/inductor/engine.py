"""The Inductor engine: ``torch.compile``'d code shared by all slots; each slot is a module with its own weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engines.base import BuildInfo
from serving.engines.cached_build import CompiledEngine, cached_build
from serving.engines.export import make_module
from serving.engines.inductor.checks import cuda_graphs_of, inductor_device
from serving.engines.inductor.compiler import InductorParts, InductorRecipe, stop_compile_workers
from serving.engines.inductor.slot import InductorSlot
from serving.specs import BuildSpec

if TYPE_CHECKING:
    import torch

    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics


class InductorEngine(CompiledEngine[InductorSlot]):
    """``torch.compile``'d code shared by all slots; each slot is a module with its own weights.

    :attr:`kept_tensors` are the module's non-persistent buffers: each slot keeps the factory's values (the
    compiled code reads them like any other attribute); a checkpoint may carry them only with these values.
    """

    kind = "inductor"
    label = "Inductor engine"

    def __init__(self, *, spec: BuildSpec, device: torch.device, build_info: BuildInfo, workdir: Path,
                 parts: InductorParts) -> None:
        super().__init__(spec=spec, device=device, build_info=build_info, workdir=workdir, weight_specs=parts.specs,
                         spare=parts.spare, kept=parts.kept)
        self.fn = parts.fn
        self.cuda_graphs = cuda_graphs_of(spec)

    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None = None,
              metrics: HotswapMetrics | None = None) -> InductorEngine:
        """Compile (loading the compiler's artifacts from ``cache`` when it holds them), warm up, check."""
        started = time.perf_counter()
        device = inductor_device(spec)
        try:
            built = cached_build(InductorRecipe(spec, device), cache, started=started)
        finally:
            stop_compile_workers()
        return cls(spec=spec, device=device, build_info=built.info, workdir=built.workdir, parts=built.parts)

    def make_slot(self) -> InductorSlot:
        slot = InductorSlot(self.spec, self.device, self.fn, make_module(self.spec, self.device), self._weight_specs,
                            cuda_graphs=self.cuda_graphs)
        if self.cuda_graphs:
            slot.capture_graphs()
        return slot


__all__ = ["InductorEngine"]
