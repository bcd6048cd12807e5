"""The TensorRT engine: a weight-stripped, refittable engine whose slots are deserialized copies of it.

:meth:`TensorRTEngine.build` checks the environment (:mod:`.environment`), reads the options
(:mod:`.options`) and builds or loads the stripped engine (:mod:`.build`); each slot
(:mod:`.slot`) is one more deserialized engine and execution context from the same plan, made by
the TensorRT runtime (:mod:`.runtime`). Double buffering = two slots = two engines and contexts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from serving.engines.base import BuildInfo, Engine
from serving.engines.tensorrt import mapping as tm
from serving.engines.tensorrt.build import build_stripped
from serving.engines.tensorrt.environment import probe_environment
from serving.engines.tensorrt.options import TrtBuildOptions
from serving.engines.tensorrt.runtime import TrtHandle, TrtRuntime
from serving.engines.tensorrt.slot import TensorRTSlot
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, WeightSpec

if TYPE_CHECKING:
    from serving.cache import EngineCache


class TensorRTEngine(Engine):
    """A weight-stripped, refittable TensorRT engine; each slot deserializes it once more."""

    kind = "tensorrt"

    def __init__(self, *, device: torch.device, build_info: BuildInfo, serialized_engine: bytes,
                 input_names: Sequence[str], output_names: Sequence[str], weight_map: tm.WeightMap,
                 literals: Mapping[str, torch.Tensor], options: TrtBuildOptions) -> None:
        super().__init__(device, build_info)
        self.serialized_engine = serialized_engine
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.weight_map = weight_map
        self.options = options
        self.literals = {k: v.to(device) for k, v in literals.items()}
        self.ignored_names = frozenset(weight_map.ignored)
        self.runtime = TrtRuntime()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None = None,
              metrics: HotswapMetrics | None = None) -> TensorRTEngine:
        """Convert (or load from the cache) and verify; :class:`EngineUnavailableError` without TensorRT."""
        t0 = time.perf_counter()
        device = torch.device(spec.device)
        env = probe_environment(device)  # raises before anything else is imported
        options = TrtBuildOptions.from_spec(spec)
        metrics = metrics or HotswapMetrics()
        built = build_stripped(spec, device, env, options, cache, metrics)
        info = BuildInfo(built.cache, time.perf_counter() - t0, built.key,
                         f"TensorRT {env.tensorrt}, Torch-TensorRT {env.torch_tensorrt}, {env.device_name} "
                         f"(sm {env.compute_capability}); stripped engine {len(built.serialized_engine)} bytes, "
                         f"{len(built.weight_map.records)} refittable weights, "
                         f"{len(built.weight_map.literal_keys)} stored constants")
        return cls(device=device, build_info=info, serialized_engine=built.serialized_engine,
                   input_names=built.input_names, output_names=built.output_names,
                   weight_map=built.weight_map, literals=built.literals, options=options)

    # ------------------------------------------------------------------ Engine
    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self.weight_map.sources

    def new_slot(self) -> TensorRTSlot:
        """A second engine and context from the stripped plan: no weights until its first refit."""
        return self.slot_from_serialized(self.serialized_engine, has_weights=False)

    def slot_from_serialized(self, data: bytes, *, has_weights: bool) -> TensorRTSlot:
        """A slot from a serialized engine: the stripped plan, or one from :meth:`TensorRTSlot.serialize_refittable`.

        With ``has_weights`` the slot serves at once; its next refit must still provide every tensor
        (the slot does not know which checkpoint the weights came from).
        """
        engine = self.runtime.deserialize(data)
        refit_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        infer_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        handle = TrtHandle(engine, self.input_names, self.output_names, self.device, infer_stream)
        refitter = self.runtime.refitter(engine)
        return TensorRTSlot(weight_map=self.weight_map, literals=self.literals, refitter=refitter,
                            backend=self.runtime.backend(), handle=handle,
                            refit_stream=refit_stream, infer_stream=infer_stream, device=self.device,
                            options=self.options, preloaded=has_weights)


def engine_nbytes_fraction(serialized_engine: bytes, specs: Mapping[str, WeightSpec]) -> float:
    """Size of a serialized engine relative to the bytes of the weights it reads (stripped: small)."""
    total = sum(s.nbytes for s in specs.values())
    return len(serialized_engine) / total if total else math.inf


__all__ = ["TensorRTEngine", "engine_nbytes_fraction"]
