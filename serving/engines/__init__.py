"""Engines behind one interface: ``eager`` and ``aoti`` run everywhere; ``tensorrt`` needs TensorRT."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from serving.engines.base import BuildInfo, Engine, WeightSlot
from serving.errors import ConfigError

if TYPE_CHECKING:
    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics
    from serving.specs import BuildSpec

#: engine kind -> (module, class); modules are imported only when that engine is chosen
ENGINES: dict[str, tuple[str, str]] = {
    "eager": ("serving.engines.eager", "EagerEngine"),
    "aoti": ("serving.engines.aoti", "AOTIEngine"),
    "inductor": ("serving.engines.inductor", "InductorEngine"),
    "tensorrt": ("serving.engines.tensorrt", "TensorRTEngine"),
}


def default_engine(device: str) -> str:
    """The documented default: ``tensorrt`` on CUDA, ``aoti`` on CPU."""
    return "tensorrt" if device.startswith("cuda") else "aoti"


def build_engine(kind: str, spec: BuildSpec, *, cache: EngineCache | None = None,
                 metrics: HotswapMetrics | None = None) -> Engine:
    """Build (or load from the stripped-engine cache) an engine of the given kind."""
    if kind not in ENGINES:
        raise ConfigError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
    module_name, class_name = ENGINES[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    engine: Engine = cls.build(spec, cache=cache, metrics=metrics)
    return engine


__all__ = ["ENGINES", "BuildInfo", "Engine", "WeightSlot", "build_engine", "default_engine"]
