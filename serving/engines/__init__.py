"""Engines behind one interface: ``eager``, ``aoti`` and ``inductor`` run everywhere; ``tensorrt`` needs TensorRT.

``engine: auto`` (the default) is resolved by :func:`select_engine`: ``aoti`` on CPU; on a GPU
``tensorrt`` when TensorRT works there, otherwise ``inductor`` (when Triton works), otherwise ``aoti``
(whose build refuses a machine where loading packages crashes). An engine that cannot run fails the
model load with the reason; nothing falls back silently to another engine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.choices import ENGINE_CHOICES
from serving.engines.base import BuildInfo, Engine, WeightSlot
from serving.errors import ConfigError, EngineUnavailableError

if TYPE_CHECKING:
    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics
    from serving.specs import BuildSpec

#: engine kind (:data:`serving.choices.ENGINE_KINDS`) -> (module, class); modules are imported only when that
#: engine is chosen
ENGINES: dict[str, tuple[str, str]] = {
    "eager": ("serving.engines.eager", "EagerEngine"),
    "aoti": ("serving.engines.aoti", "AOTIEngine"),
    "inductor": ("serving.engines.inductor", "InductorEngine"),
    "tensorrt": ("serving.engines.tensorrt", "TensorRTEngine"),
}


@dataclass(frozen=True)
class EngineChoice:
    """The engine a model instance uses, and why (for the startup log)."""

    kind: str
    reason: str


def default_engine(device: str) -> str:
    """The default without probing anything: ``aoti`` on CPU, ``tensorrt`` on CUDA (see :func:`select_engine`)."""
    return "tensorrt" if device.startswith("cuda") else "aoti"


def _tensorrt_problem(device: str) -> str:
    """'' when TensorRT can run on ``device``, else why not."""
    import torch

    from serving.engines.tensorrt.environment import probe_environment

    try:
        probe_environment(torch.device(device))
    except EngineUnavailableError as e:
        lines = [ln.strip(" -") for ln in str(e).splitlines()[1:] if ln.startswith("  - ")]
        return "; ".join(lines) or str(e)
    return ""


def _inductor_problem(device: str) -> str:
    """'' when Inductor can generate GPU code here (Triton), else why not."""
    import torch
    from torch.utils._triton import has_triton

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return "" if has_triton() else "the 'triton' package is missing or does not support this GPU"


def select_engine(requested: str, device: str) -> EngineChoice:
    """Resolve ``auto``; a named engine is used as asked (its build says if it cannot run)."""
    if requested != "auto":
        if requested not in ENGINES:
            raise ConfigError(f"unknown engine {requested!r}; choose one of {list(ENGINE_CHOICES)}")
        return EngineChoice(requested, "set in the configuration")
    if not device.startswith("cuda"):
        return EngineChoice("aoti", "the default on CPU")
    trt = _tensorrt_problem(device)
    if not trt:
        return EngineChoice("tensorrt", "TensorRT works on this machine")
    inductor = _inductor_problem(device)
    if not inductor:
        return EngineChoice("inductor", f"TensorRT cannot run here ({trt}); inductor is the compiled engine "
                                        "that works on this GPU")
    return EngineChoice("aoti", f"TensorRT cannot run here ({trt}) and neither can inductor ({inductor})")


def build_engine(kind: str, spec: BuildSpec, *, cache: EngineCache | None = None,
                 metrics: HotswapMetrics | None = None) -> Engine:
    """Build (or load from the stripped-engine cache) an engine of the given kind."""
    if kind not in ENGINES:
        raise ConfigError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
    module_name, class_name = ENGINES[kind]
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls.build(spec, cache=cache, metrics=metrics)


__all__ = ["ENGINES", "ENGINE_CHOICES", "BuildInfo", "Engine", "EngineChoice", "WeightSlot", "build_engine",
           "default_engine", "select_engine"]
