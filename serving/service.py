"""One served model, independent of Triton: engine from the stripped cache, coordinator, watcher.

The Triton model (``serving.triton``) and ``hotswap watch`` are thin shells around
:class:`HotswapService`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial

import torch

from serving.cache import EngineCache
from serving.engines import Engine, build_engine, select_engine
from serving.errors import NotReadyError
from serving.factory import build_module
from serving.metrics import HotswapMetrics
from serving.refit import CanaryConfig, RefitCoordinator, RefitReport
from serving.settings import ServingSettings
from serving.specs import BuildSpec, TensorSpec, dtype_from_name
from serving.watch import WeightsWatcher
from serving.watch.outcome import EntryOutcome
from serving.weights import CheckpointPolicy, ValidationPolicy
from serving.weights.fastpath import FastPathConfig

log = logging.getLogger(__name__)


def build_spec_for(settings: ServingSettings, inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec], max_batch: int) -> BuildSpec:
    """The engine build of a served model."""
    return BuildSpec(factory=settings.model_factory, inputs=tuple(inputs), outputs=tuple(outputs),
                     max_batch=max(1, max_batch), device=settings.device,
                     dtype=dtype_from_name(settings.dtype),
                     factory_kwargs=settings.factory_kwargs,
                     options=settings.engine_options + ((("cuda_graphs", True),) if settings.cuda_graphs else ()))


def fast_path_config_for(settings: ServingSettings) -> FastPathConfig:
    """The fast path's readers of a served model (settings ``weights_*``)."""
    return FastPathConfig(transfer=settings.weights_transfer, threads=settings.weights_reader_threads,
                          read_bytes=settings.weights_read_bytes, task_bytes=settings.weights_task_bytes)


class HotswapService:
    """Engine + refit coordinator + weights watcher for one model instance."""

    def __init__(self, settings: ServingSettings, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], max_batch: int, metrics: HotswapMetrics) -> None:
        self.settings = settings
        self.spec = build_spec_for(settings, inputs, outputs, max_batch)
        self.metrics = metrics
        self.engine: Engine | None = None
        self.coordinator: RefitCoordinator | None = None
        self.watcher: WeightsWatcher | None = None
        self.initial: RefitReport | None = None
        #: what startup did with each entry of the weights folder
        self.initial_entries: tuple[EntryOutcome, ...] = ()

    def start(self, *, require_weights: bool = True) -> RefitReport | None:
        """Build or load the engine, install the newest valid weights, start watching.

        Raises :class:`NotReadyError` (saying why) when no valid weights are in the folder: a model
        without weights must not report ready. ``require_weights=False`` (``hotswap watch``) starts
        watching anyway and returns ``None``; inference raises NotReadyError until weights arrive.
        """
        s = self.settings
        t0 = time.perf_counter()
        self.metrics.prime()
        cache = EngineCache(s.engine_cache_dir, max_bytes=s.engine_cache_max_bytes, metrics=self.metrics)
        choice = select_engine(s.engine, s.device)
        log.info("%s: engine %s on %s (%s)", s.model_name, choice.kind, s.device, choice.reason)
        self.engine = build_engine(choice.kind, self.spec, cache=cache, metrics=self.metrics)
        info = self.engine.build_info
        log.info("%s: engine %s ready in %.2fs (cache %s%s)", s.model_name, choice.kind, info.seconds,
                 info.cache, f", {info.detail}" if info.detail else "")
        canary = CanaryConfig(s.canary, atol=s.canary_atol, rtol=s.canary_rtol)
        reference = partial(self._reference_module) if s.canary == "reference" else None
        self.coordinator = RefitCoordinator(
            self.engine, strategy=s.refit_strategy, canary=canary, canary_input_specs=self.spec.inputs,
            reference_factory=reference, metrics=self.metrics,
            fast_path_config=fast_path_config_for(s),
            checkpoint_policy=CheckpointPolicy(allow_pickle=s.allow_pickle, max_bytes=s.max_file_bytes,
                                               root=s.weights_dir),
            validation_policy=ValidationPolicy(unexpected=s.unexpected_tensors, cast=s.dtype_cast,
                                               strip_prefix=s.strip_prefix),
        )
        s.weights_dir.mkdir(parents=True, exist_ok=True)
        self.watcher = WeightsWatcher.from_settings(s, self.coordinator, self.metrics)
        initial = self.watcher.install_initial()
        self.initial_entries = initial.entries
        if require_weights and (initial.report is None or not self.coordinator.ready):
            self.close()
            raise NotReadyError(
                f"model {s.model_name!r} has no valid weights in {s.weights_dir} ({initial.explain()}); publish a "
                "checkpoint there (e.g. `hotswap weights random --factory ... -o v1.safetensors && hotswap publish "
                "v1.safetensors --to <dir>`) and load again"
            )
        self.initial = initial.report if self.coordinator.ready else None
        self.watcher.start()
        log.info("%s: serving weights %r after %.2fs; watching %s (%s)", s.model_name,
                 self.coordinator.live_version, time.perf_counter() - t0, s.weights_dir, s.watch_mode)
        return self.initial

    def _reference_module(self) -> torch.nn.Module:
        module = build_module(self.spec.factory, self.spec.kwargs())
        return module.to(device=self.settings.device, dtype=self.spec.dtype)

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.coordinator is None:
            raise NotReadyError(f"model {self.settings.model_name!r} is not started")
        return self.coordinator.infer(inputs)

    def infer_versioned(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """The outputs and the version of the weights that computed them."""
        if self.coordinator is None:
            raise NotReadyError(f"model {self.settings.model_name!r} is not started")
        return self.coordinator.infer_versioned(inputs)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the watcher and its worker (bounded by ``timeout``), then drop the engine."""
        if self.watcher is not None:
            self.watcher.stop(timeout)
            self.watcher = None
            log.info("%s: watcher stopped", self.settings.model_name)
        if self.coordinator is not None:
            self.coordinator.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
