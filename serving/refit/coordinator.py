"""The refit coordinator: one pipeline from a weight source to the live slot, for either strategy."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from serving.engines.base import Engine, WeightSlot
from serving.errors import OutOfMemoryError, RefitError
from serving.metrics import HotswapMetrics
from serving.refit.canary import Canary, CanaryConfig
from serving.refit.memory import allocating, weights_nbytes
from serving.refit.report import RefitReport, Refused, StagedWeights, StageTimer, verdict
from serving.refit.slots import Slots, ptrs
from serving.refit.sources import FastSource, HostSource, StagedSource, WeightSource
from serving.refit.steps import Steps
from serving.refit.strategies import Strategy, strategy_named
from serving.specs import TensorSpec
from serving.weights import CheckpointPolicy, ValidationPolicy
from serving.weights.fastpath import FastPathConfig, FastReader
from serving.weights.transfer import TransferChoice

log = logging.getLogger(__name__)


class RefitCoordinator:
    """Owns an engine's slots; serves inference and installs new weights atomically."""

    def __init__(
        self,
        engine: Engine,
        *,
        strategy: str = "double_buffer",
        canary: CanaryConfig | None = None,
        canary_input_specs: Sequence[TensorSpec] = (),
        reference_factory: Callable[[], torch.nn.Module] | None = None,
        metrics: HotswapMetrics | None = None,
        checkpoint_policy: CheckpointPolicy | None = None,
        validation_policy: ValidationPolicy | None = None,
        fast_path: bool | None = None,
        fast_path_config: FastPathConfig | None = None,
        in_place_prescan: bool = True,
    ) -> None:
        """``fast_path``: stream checkpoints straight into the slots' tensors (None: on CUDA engines, and on the
        CPU when double-buffered; see :func:`fast_path_default`).
        ``in_place_prescan``: in place, read and check the checkpoint once before holding requests."""
        self._strategy = strategy_named(strategy)
        self.strategy = strategy
        self.engine = engine
        self._canary = Canary(canary, canary_input_specs, reference_factory)
        self.canary = self._canary.config
        self.metrics = metrics or HotswapMetrics()
        self.checkpoint_policy = checkpoint_policy or CheckpointPolicy()
        self.validation_policy = validation_policy or ValidationPolicy()

        self._slots = Slots(engine)
        self._refit_lock = threading.RLock()  # one refit at a time
        self.live: StagedWeights | None = None
        self.previous: StagedWeights | None = None
        # the previous version when its tensors were overwritten: a checkpoint file to re-read on rollback
        self._previous_file: StagedWeights | None = None

        device = getattr(engine, "device", torch.device("cpu"))
        self.fast_path = fast_path_default(device, self._strategy) if fast_path is None else fast_path
        self.fast_path_config = fast_path_config or FastPathConfig()
        self.in_place_prescan = in_place_prescan
        self._reader: FastReader | None = None

    # ------------------------------------------------------------------ serving
    @property
    def ready(self) -> bool:
        return self._slots.active is not None

    @property
    def live_version(self) -> str | None:
        return self.live.version if self.live else None

    @property
    def active_slot(self) -> WeightSlot | None:
        """The slot requests run on now (None: not ready)."""
        return self._slots.active

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run one (batched) inference on the live weights. Waits only on an in-place swap."""
        with self._slots.acquire() as lease:
            return lease.slot.run(inputs)

    def infer_versioned(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """Like :meth:`infer`, and the version of the weights that computed the outputs: read from the same
        lease as the slot, so the two cannot disagree (base version, ``+adapter`` with a LoRA merged)."""
        with self._slots.acquire() as lease:
            return lease.slot.run(inputs), lease.version or ""

    # ------------------------------------------------------------------ refits
    def refit_from_path(self, path: Path, *, version: str | None = None,
                        content_hash: str | None = None) -> RefitReport:
        """Read, validate and install a checkpoint file or directory. Never raises for bad input."""
        path = Path(path)
        source: WeightSource
        if self.fast_path and self._fast_path_safe():
            source = self._fast_source(path, version, content_hash)
        else:
            source = HostSource(path, version, content_hash, engine=self.engine,
                                policy=self.checkpoint_policy, validation=self.validation_policy)
        return self._refit(source)

    def install(self, staged: StagedWeights) -> RefitReport:
        """Install a validated weight set (complete: every weight spec) atomically."""
        return self._refit(StagedSource(staged))

    def rollback(self) -> RefitReport:
        """Reinstall the previous version (one step back)."""
        with self._refit_lock:
            previous, on_file = self.previous, self._previous_file
        if previous is None and on_file is not None:  # its tensors were overwritten: re-read its file
            return self.refit_from_path(Path(on_file.source), version=on_file.version,
                                        content_hash=on_file.content_hash)
        if previous is None:
            err = Refused(RefitError("nothing to roll back to: no previous version is kept"))
            return self._report_error(self.live_version or "", err, StageTimer(), {})
        return self.install(previous)

    def identify(self, version: str, content_hash: str) -> StagedWeights | None:
        """Record the content hash of the live weights ``version``, computed after they went live (large
        checkpoints are hashed after the swap). Returns the live weights as updated, None if ``version``
        is not live (anymore) or already has a hash."""
        with self._refit_lock:
            live = self.live
            if live is None or live.version != version or live.content_hash is not None:
                return None
            self.live = dataclasses.replace(live, content_hash=content_hash)
            return self.live

    def _refit(self, source: WeightSource) -> RefitReport:
        """The pipeline: open the source, then under the lock: no-op check, the strategy, the report."""
        timer = StageTimer()
        try:
            with allocating("the new weights in host memory", "host", weights_nbytes(self.engine.weight_specs()),
                            "Free memory on the host"):
                source.open(timer)  # off the lock: the host path reads the whole checkpoint here
        except (Refused, OutOfMemoryError) as e:
            return self._report_error(source.version, e, timer, source.detail)
        with self._refit_lock:
            live = self.live
            if live is not None and source.content_hash is not None and source.content_hash == live.content_hash:
                return self._finish(RefitReport("noop", live.version, live.version, timer.finish(), "same_content",
                                                f"{source.version!r} has the content already live",
                                                detail=source.detail))
            steps = Steps(self._slots, source, timer, self._canary, live, self._reopen)
            try:
                source.check(self.engine)
                written = self._strategy.install(steps)
            except Exception as e:
                if steps.live_lost:
                    self.live = None
                self._forget_overwritten(source.overwritten)
                return self._report_error(source.version, e, timer, source.detail)
            self.live = written.staged
            self.previous, self._previous_file = _detached(live, source.overwritten)
            report = RefitReport("success", written.staged.version, live.version if live else None,
                                 timer.finish(), tensors_refitted=written.count, detail=source.detail)
            self.metrics.set_live_version(written.staged.version, time.time())
            return self._finish(report)

    def _forget_overwritten(self, overwritten: Mapping[str, torch.Tensor]) -> None:
        """A previous version whose tensors were written over survives only as its file (if any)."""
        if self.previous is not None and ptrs(self.previous.tensors) & ptrs(overwritten):
            self.previous, self._previous_file = _detached(self.previous, overwritten)

    # ------------------------------------------------------------------ fast path
    @property
    def transfers(self) -> dict[str, TransferChoice]:
        """The transfer the fast path chose for each device it has read into, and why (empty before its first
        read, or when the fast path is off)."""
        return {str(d): c for d, c in self._reader.choices.items()} if self._reader is not None else {}

    def _fast_reader(self) -> FastReader:
        if self._reader is None:
            self._reader = FastReader(self.fast_path_config)
        return self._reader

    def _fast_source(self, path: Path, version: str | None, content_hash: str | None) -> FastSource:
        return FastSource(path, version, content_hash, engine=self.engine, policy=self.checkpoint_policy,
                          validation=self.validation_policy, reader=self._fast_reader,
                          prescan=self.in_place_prescan)

    def _reopen(self, staged: StagedWeights) -> FastSource:
        return self._fast_source(Path(staged.source), staged.version, staged.content_hash)

    def _fast_path_safe(self) -> bool:
        """A strategy that overwrites the live tensors may do so only if a file can bring them back:
        if they are not exactly a file's content (a LoRA merge, weights installed from memory), a
        failed refit could not restore them, so the refit takes the host path."""
        with self._refit_lock:
            live, slot = self.live, self._slots.active
            if not self._strategy.overwrites_live or live is None or slot is None or live.file_exact:
                return True
            unsafe = bool(ptrs(live.tensors) & ptrs(self._slots.buffers(slot)))
        if unsafe:
            log.info("live weights %s are not a file's content; this in-place refit takes the host path",
                     live.version)
        return not unsafe

    # ------------------------------------------------------------------ reports
    def _report_error(self, version: str, error: BaseException, timer: StageTimer,
                      detail: Mapping[str, float]) -> RefitReport:
        v = verdict(error)
        if v.outcome == "failed":
            log.error("refit to %s failed", version, exc_info=error)
        return self._finish(RefitReport(v.outcome, version, self.live_version, timer.finish(), v.reason, v.message,
                                        detail=detail))

    def _finish(self, report: RefitReport) -> RefitReport:
        self.metrics.count_refit(report.outcome, report.reason)
        if report.outcome in ("success", "rolled_back"):
            self.metrics.observe_stages(report.stages)
        level = logging.INFO if report.ok else logging.WARNING
        log.log(level, "refit %s -> %s (%s) %s", report.version, report.outcome,
                report.reason or "ok", report.message)
        return report

    def close(self) -> None:
        """Drop the slots (the engine is closed by its owner)."""
        self._slots.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def fast_path_default(device: torch.device, strategy: Strategy) -> bool:
    """Whether refits from files take the fast path unless told otherwise.

    On CUDA, always. On the CPU, when double-buffered: the checkpoint is read straight into the standby
    slot's own tensors (an AOTI slot's registered buffers, an eager module's parameters), so nothing is
    allocated, copied a second time, or read again to validate it. An in-place refit on the CPU stages
    the new weights in host memory instead: requests are then held only for the refit, and a failure
    is restored from memory (the fast path would hold them for a whole read of the file, and restore
    by reading the previous file again).
    """
    return device.type == "cuda" or (device.type == "cpu" and not strategy.overwrites_live)


def _detached(staged: StagedWeights | None, overwritten: Mapping[str, torch.Tensor]
              ) -> tuple[StagedWeights | None, StagedWeights | None]:
    """(kept in memory, kept as a file): a version whose tensors are overwritten survives as its file."""
    if staged is None or not ptrs(staged.tensors) & ptrs(overwritten):
        return staged, None
    if staged.file_exact and staged.source:
        return None, StagedWeights(staged.version, {}, staged.source, staged.content_hash, file_exact=True)
    return None, None
