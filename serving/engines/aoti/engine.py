"""The AOTI engine: a weight-stripped AOTInductor package; each slot is a runner of its own."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from serving.engines.aoti.compiler import AOTIParts, AOTIRecipe, make_slot
from serving.engines.aoti.runner import load_runner
from serving.engines.aoti.slot import AOTISlot
from serving.engines.base import BuildInfo, build_device
from serving.engines.cached_build import CompiledEngine, cached_build
from serving.specs import BuildSpec

if TYPE_CHECKING:
    import torch

    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics


class AOTIEngine(CompiledEngine[AOTISlot]):
    """A weight-stripped AOTInductor package; slots are separately loaded runners."""

    kind = "aoti"
    label = "AOTI engine"

    def __init__(self, *, spec: BuildSpec, device: torch.device, build_info: BuildInfo, workdir: Path,
                 parts: AOTIParts) -> None:
        super().__init__(spec=spec, device=device, build_info=build_info, workdir=workdir, weight_specs=parts.specs,
                         spare=parts.spare, ignored=parts.ignored, kept=parts.kept)
        self.package_path = parts.package
        #: why each kept tensor was kept (the build log says it too)
        self.kept_why: Mapping[str, str] = MappingProxyType(dict(parts.why))

    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None = None,
              metrics: HotswapMetrics | None = None) -> AOTIEngine:
        """Load from ``cache`` when it holds this build, else export, compile and store; either way one slot is
        refitted through serving's own call before the engine is handed out."""
        started = time.perf_counter()
        device = build_device(spec, "AOTI engine")
        built = cached_build(AOTIRecipe(spec, device, meta=cache is not None), cache, started=started)
        return cls(spec=spec, device=device, build_info=built.info, workdir=built.workdir, parts=built.parts)

    def make_slot(self) -> AOTISlot:
        return make_slot(load_runner(self.package_path, self.device), self.spec, self.device, self._weight_specs,
                         self.ignored_names, self.kept_tensors)


__all__ = ["AOTIEngine"]
