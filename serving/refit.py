"""The refit coordinator: stage new weights off the serving path, verify them, swap atomically.

Two strategies behind one setting:

``double_buffer`` (default)
    Two slots of the engine. New weights are transferred into the *standby* slot and
    refitted there while the *active* slot keeps serving; the canary runs on the standby
    slot; then a pointer switch under a lock makes it active. Inference never sees a
    half-updated set: a request runs entirely on one slot, and a slot is only refitted
    once every request that started on it has finished.

``in_place``
    One slot, for models too large for two copies. New weights are transferred first
    (off the serving path), then new requests are held back, running ones drain, the slot
    is refitted and verified, and serving resumes. A failed verify restores the last good
    weights before serving resumes.

The coordinator keeps the host tensors of the live and the previous version, so
:meth:`RefitCoordinator.rollback` is one call; a slot remembers which host tensors it
holds, so only tensors that differ are transferred and refitted (a LoRA merge touches a
few; a rollback in double-buffer mode is a bare pointer switch).

The fast path (default when the engine is on CUDA; ``fast_path=True`` forces it on the CPU):
:meth:`RefitCoordinator.refit_from_path` streams the checkpoint through a small pinned pool
straight into the device tensors a slot will run with (:mod:`serving.weights.fastpath`), so
the staged weights *are* device tensors and the slot's transfer is free.

* ``double_buffer``: the new weights are written into the standby slot's tensors (reused from
  one refit to the next; never tensors the live slot reads), so two device copies exist and no
  third. The previous version stays in the standby slot until the next refit starts
  overwriting it: rollback is still a pointer switch.
* ``in_place``: the checkpoint is first read and checked off the serving path without being
  kept (NaN/Inf), then requests are held and it is streamed straight into the live tensors.
  One device copy exists. If the new weights fail once written (the canary), the last good
  ones are streamed back from their own file. The previous version is not kept in memory but
  remembered as a file: :meth:`~RefitCoordinator.rollback` re-reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.engines.base import Engine, WeightSlot
from serving.errors import CanaryError, ConfigError, HotswapError, NotReadyError, RefitError
from serving.metrics import HotswapMetrics
from serving.specs import TensorSpec
from serving.weights import CheckpointPolicy, LoadedWeights, ValidationPolicy, load_weights
from serving.weights.fastpath import FastPathConfig, FastReader, read_checkpoint_into
from serving.weights.loader import CheckedCheckpoint, open_checkpoint, read_checked

log = logging.getLogger(__name__)

STRATEGIES = ("double_buffer", "in_place")
CANARY_MODES = ("off", "finite", "reference")


@dataclass(frozen=True)
class StagedWeights:
    """A complete, validated weight set in the engine's dtypes, on the host."""

    version: str
    tensors: Mapping[str, torch.Tensor]
    source: str = ""
    content_hash: str | None = None
    #: ``tensors`` are exactly what the checkpoint at ``source`` holds (cast to the engine's dtypes),
    #: so the file can bring them back (the fast path's in-place restore and rollback rely on it)
    file_exact: bool = False

    @classmethod
    def from_loaded(cls, loaded: LoadedWeights, content_hash: str | None = None) -> StagedWeights:
        return cls(loaded.version, loaded.tensors, str(loaded.source), content_hash, file_exact=True)


@dataclass(frozen=True)
class RefitReport:
    """What one refit did: outcome, the version it installed (or refused), time per stage."""

    outcome: str  # success | rejected | failed | rolled_back | noop
    version: str | None
    previous_version: str | None
    stages: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""
    message: str = ""
    tensors_refitted: int = 0
    #: the fast path's figures: bytes read, where the streaming time went (seconds), GB/s
    detail: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in ("success", "noop")


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


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def stage(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - since
        return now

    def finish(self) -> dict[str, float]:
        self.stages["total"] = time.perf_counter() - self._t0
        return self.stages


class _RolledBack(Exception):
    """An in-place refit failed after it had written the live tensors, which were then restored."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _ptrs(tensors: Mapping[str, torch.Tensor] | None) -> set[int]:
    """Addresses of the tensors' first elements: which memory they are (empty tensors excluded)."""
    return {t.data_ptr() for t in (tensors or {}).values() if t.numel()}


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
        """``fast_path``: stream checkpoints straight into the slots' tensors (None: on CUDA engines).
        ``in_place_prescan``: in place, read and check the checkpoint once before holding requests."""
        if strategy not in STRATEGIES:
            raise ConfigError(f"refit_strategy {strategy!r}: choose one of {STRATEGIES}")
        self.engine = engine
        self.strategy = strategy
        self.canary = canary or CanaryConfig(mode="off")
        if self.canary.mode == "reference" and reference_factory is None:
            raise ConfigError("canary mode 'reference' needs a reference_factory (the eager model)")
        if self.canary.mode != "off" and not canary_input_specs:
            raise ConfigError("a canary needs the model's input specs")
        self._canary_inputs = (canary_inputs(canary_input_specs, self.canary.batch, self.canary.seed)
                               if self.canary.mode != "off" else [])
        self._reference_factory = reference_factory
        self._reference: torch.nn.Module | None = None
        self.metrics = metrics or HotswapMetrics()
        self.checkpoint_policy = checkpoint_policy or CheckpointPolicy()
        self.validation_policy = validation_policy or ValidationPolicy()

        self._cond = threading.Condition()  # guards _active, _users, _held
        self._active: WeightSlot | None = None
        self._standby: WeightSlot | None = None
        self._users: dict[int, int] = {}  # id(slot) -> requests running on it
        self._held = False  # in-place refit: new requests wait
        self._contents: dict[int, dict[str, torch.Tensor] | None] = {}  # id(slot) -> host tensors it holds
        self._refit_lock = threading.RLock()  # one refit at a time (re-entered by the fast path)
        self.live: StagedWeights | None = None
        self.previous: StagedWeights | None = None

        device = getattr(engine, "device", torch.device("cpu"))
        self.fast_path = device.type == "cuda" if fast_path is None else fast_path
        self.fast_path_config = fast_path_config or FastPathConfig()
        self.in_place_prescan = in_place_prescan
        self._reader: FastReader | None = None
        # id(slot) -> the tensors (on the engine's device) the slot was last refitted with
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        # the previous version when its tensors were overwritten: a checkpoint file to re-read on rollback
        self._previous_file: StagedWeights | None = None

    # ------------------------------------------------------------------ serving
    @property
    def ready(self) -> bool:
        return self._active is not None

    @property
    def live_version(self) -> str | None:
        return self.live.version if self.live else None

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run one (batched) inference on the live weights. Waits only on an in-place swap."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            slot = self._active
            if slot is None:
                raise NotReadyError("no weights installed yet: the model is not ready")
            self._users[id(slot)] = self._users.get(id(slot), 0) + 1
        try:
            return slot.run(inputs)
        finally:
            with self._cond:
                self._users[id(slot)] -= 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ refits
    def refit_from_path(self, path: Path, *, version: str | None = None,
                        content_hash: str | None = None) -> RefitReport:
        """Read, validate and install a checkpoint file or directory. Never raises for bad input."""
        if self.fast_path and not self._fast_path_unsafe():
            return self._refit_fast(Path(path), version, content_hash)
        timer = _Timer()
        try:
            loaded = load_weights(
                Path(path), self.engine.weight_specs(), policy=self.checkpoint_policy,
                validation=self.validation_policy, version=version,
                ignored=getattr(self.engine, "ignored_names", frozenset()),
            )
        except HotswapError as e:
            return self._rejected(version or Path(path).name, e, timer)
        timer.stages["read"] = loaded.read_s
        timer.stages["validate"] = loaded.validate_s
        return self.install(StagedWeights.from_loaded(loaded, content_hash), _timer=timer)

    def install(self, staged: StagedWeights, *, _timer: _Timer | None = None) -> RefitReport:
        """Install a validated weight set (complete: every weight spec) atomically."""
        timer = _timer or _Timer()
        with self._refit_lock:
            if (self.live is not None and staged.content_hash is not None
                    and staged.content_hash == self.live.content_hash):
                return self._finish(RefitReport("noop", self.live.version, self.live.version,
                                                timer.finish(), "same_content",
                                                f"{staged.version!r} has the content already live"))
            missing = sorted(set(self.engine.weight_specs()) - set(staged.tensors))
            if missing:
                err = RefitError(f"{staged.source or staged.version}: weight set incomplete, missing {missing[:10]}")
                return self._rejected(staged.version, err, timer)
            try:
                if self.strategy == "double_buffer":
                    n = self._install_double_buffer(staged, timer)
                else:
                    n = self._install_in_place(staged, timer)
            except CanaryError as e:
                # double buffer: the new weights never served; in place: the old ones were restored
                rolled_back = self.strategy == "in_place" and self.live is not None
                outcome = "rolled_back" if rolled_back else "rejected"
                return self._finish(RefitReport(outcome, staged.version, self.live_version,
                                                timer.finish(), e.reason, str(e)))
            except Exception as e:  # an engine failure: the previous weights keep serving
                log.exception("refit to %s failed", staged.version)
                reason = e.reason if isinstance(e, HotswapError) else "refit_failed"
                return self._finish(RefitReport("failed", staged.version, self.live_version,
                                                timer.finish(), reason, f"{type(e).__name__}: {e}"))
            self.previous, self.live = self.live, staged
            self._previous_file = None
            report = RefitReport("success", staged.version,
                                 self.previous.version if self.previous else None,
                                 timer.finish(), tensors_refitted=n)
            self.metrics.set_live_version(staged.version, time.time())
            return self._finish(report)

    def rollback(self) -> RefitReport:
        """Reinstall the previous version (one step back)."""
        with self._refit_lock:
            previous, on_file = self.previous, self._previous_file
        if previous is None and on_file is not None:  # its tensors were overwritten: re-read its file
            return self.refit_from_path(Path(on_file.source), version=on_file.version,
                                        content_hash=on_file.content_hash)
        if previous is None:
            err = RefitError("nothing to roll back to: no previous version is kept")
            return self._rejected(self.live_version or "", err, _Timer())
        return self.install(previous)

    # ------------------------------------------------------------------ fast path
    def _fast_reader(self) -> FastReader:
        if self._reader is None:
            self._reader = FastReader(self.fast_path_config)
        return self._reader

    def _fast_path_unsafe(self) -> bool:
        """In place, the live tensors are overwritten; if they are not exactly a file's content (a LoRA
        merge, weights installed from memory), a failed refit could not restore them: use the host path."""
        with self._refit_lock:
            live, slot = self.live, self._active
            if self.strategy != "in_place" or live is None or slot is None or live.file_exact:
                return False
            unsafe = bool(_ptrs(live.tensors) & _ptrs(self._buffers.get(id(slot))))
        if unsafe:
            log.info("live weights %s are not a file's content; this in-place refit takes the host path",
                     live.version)
        return unsafe

    def _refit_fast(self, path: Path, version: str | None, content_hash: str | None) -> RefitReport:
        timer = _Timer()
        try:
            checked = open_checkpoint(path, self.engine.weight_specs(), policy=self.checkpoint_policy,
                                      validation=self.validation_policy, version=version,
                                      ignored=getattr(self.engine, "ignored_names", frozenset()))
        except HotswapError as e:
            return self._rejected(version or path.name, e, timer)
        timer.stages["read"] = checked.open_s
        timer.stages["validate"] = checked.check_s
        detail: dict[str, float] = {"bytes": float(checked.nbytes)}
        with self._refit_lock:
            if self.live is not None and content_hash is not None and content_hash == self.live.content_hash:
                return self._finish(RefitReport("noop", self.live.version, self.live.version, timer.finish(),
                                                "same_content", f"{checked.version!r} has the content already live"))
            try:
                if self.strategy == "double_buffer":
                    staged, n = self._fast_double_buffer(checked, content_hash, timer, detail)
                else:
                    staged, n = self._fast_in_place(checked, content_hash, timer, detail)
            except _RolledBack as rb:
                cause = rb.error
                reason = cause.reason if isinstance(cause, HotswapError) else "refit_failed"
                return self._finish(RefitReport("rolled_back", checked.version, self.live_version, timer.finish(),
                                                reason, f"{type(cause).__name__}: {cause}", detail=detail))
            except CanaryError as e:  # never served
                return self._finish(RefitReport("rejected", checked.version, self.live_version, timer.finish(),
                                                e.reason, str(e), detail=detail))
            except HotswapError as e:  # the data was refused (NaN/Inf, truncated, changed while read)
                if isinstance(e, RefitError):
                    log.exception("refit to %s failed", checked.version)
                    return self._finish(RefitReport("failed", checked.version, self.live_version,
                                                    timer.finish(), e.reason, str(e), detail=detail))
                return self._rejected(checked.version, e, timer)
            except Exception as e:  # an engine failure: the previous weights keep serving
                log.exception("refit to %s failed", checked.version)
                return self._finish(RefitReport("failed", checked.version, self.live_version, timer.finish(),
                                                "refit_failed", f"{type(e).__name__}: {e}", detail=detail))
            old = self.live
            self.live = staged
            self.previous, self._previous_file = self._detached(old, staged.tensors)
            report = RefitReport("success", staged.version, old.version if old else None, timer.finish(),
                                 tensors_refitted=n, detail=detail)
            self.metrics.set_live_version(staged.version, time.time())
            return self._finish(report)

    @staticmethod
    def _detached(staged: StagedWeights | None, overwritten: Mapping[str, torch.Tensor]
                  ) -> tuple[StagedWeights | None, StagedWeights | None]:
        """(kept in memory, kept as a file): a version whose tensors are overwritten survives as its file."""
        if staged is None or not _ptrs(staged.tensors) & _ptrs(overwritten):
            return staged, None
        if staged.file_exact and staged.source:
            return None, StagedWeights(staged.version, {}, staged.source, staged.content_hash, file_exact=True)
        return None, None

    def _claim(self, slot: WeightSlot, checked: CheckedCheckpoint, *, protect_live: bool) -> dict[str, torch.Tensor]:
        """The tensors to write the new weights into: the slot's own where they fit and nothing else
        reads them, fresh ones otherwise. Marks the slot's contents unknown and lets go of a previous
        version whose tensors these are."""
        device = self.engine.device
        held = self._buffers.get(id(slot))
        if held is None:  # a fresh slot: its own tensors (an eager module's, AOTI's constant buffers)
            held = dict(slot.buffers())
        protected: set[int] = set()
        if protect_live:
            protected = _ptrs(self.live.tensors if self.live else None)
            for sid, tensors in self._buffers.items():
                if sid != id(slot):
                    protected |= _ptrs(tensors)
        dest: dict[str, torch.Tensor] = {}
        taken: set[int] = set()
        for name in checked.needed:
            spec = checked.specs[name]
            t = held.get(name)
            fits = (t is not None and t.device.type == device.type
                    and (device.index is None or t.device.index == device.index)
                    and t.dtype == spec.dtype and tuple(t.shape) == spec.shape and t.is_contiguous()
                    and (not t.numel() or t.data_ptr() not in protected | taken))
            if fits:
                assert t is not None
                dest[name] = t.detach()
                if t.numel():
                    taken.add(t.data_ptr())
            else:
                dest[name] = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        self._contents[id(slot)] = None
        if self.previous is not None and _ptrs(self.previous.tensors) & _ptrs(dest):
            self.previous, self._previous_file = self._detached(self.previous, dest)
        return dest

    def _stream_into(self, checked: CheckedCheckpoint, dest: Mapping[str, torch.Tensor],
                     content_hash: str | None, timer: _Timer, detail: dict[str, float]) -> StagedWeights:
        loaded = read_checked(checked, policy=self.checkpoint_policy, validation=self.validation_policy,
                              out=dest, reader=self._fast_reader())
        stats = loaded.stats
        if stats is not None:
            timer.stages["transfer"] = timer.stages.get("transfer", 0.0) + stats.seconds - stats.finish_s
            timer.stages["validate"] = timer.stages.get("validate", 0.0) + stats.finish_s
            detail.update(wait_read_s=stats.wait_read_s, wait_copy_s=stats.wait_copy_s,
                          stream_s=stats.seconds, stream_gbps=stats.gbps)
        return StagedWeights.from_loaded(loaded, content_hash)

    def _fast_double_buffer(self, checked: CheckedCheckpoint, content_hash: str | None, timer: _Timer,
                            detail: dict[str, float]) -> tuple[StagedWeights, int]:
        standby = self._free_standby(timer)
        dest = self._claim(standby, checked, protect_live=True)
        staged = self._stream_into(checked, dest, content_hash, timer, detail)
        n = self._load_slot(standby, staged, timer, dict(staged.tensors))
        self._verify(standby, staged, timer)
        t = time.perf_counter()
        with self._cond:
            self._standby, self._active = self._active, standby
        t = timer.stage("swap", t)
        timer.stages["pause"] = timer.stages["swap"]
        return staged, n

    def _fast_in_place(self, checked: CheckedCheckpoint, content_hash: str | None, timer: _Timer,
                       detail: dict[str, float]) -> tuple[StagedWeights, int]:
        if self._active is None:  # nothing serves yet: no need to hold anything
            slot = self.engine.new_slot()
            self._contents[id(slot)] = None
            dest = self._claim(slot, checked, protect_live=False)
            staged = self._stream_into(checked, dest, content_hash, timer, detail)
            n = self._load_slot(slot, staged, timer, dict(staged.tensors))
            self._verify(slot, staged, timer)
            with self._cond:
                self._active = slot
            return staged, n
        slot = self._active
        if self.in_place_prescan:  # refuse NaN/Inf before touching the live tensors
            t = time.perf_counter()
            stats = read_checkpoint_into(checked.candidate, checked.metas, checked.specs, checked.needed, None,
                                         reader=self._fast_reader(), device=self.engine.device)
            timer.stage("prescan", t)
            detail["prescan_gbps"] = stats.gbps
        t_hold = time.perf_counter()
        with self._cond:
            self._held = True
            self._cond.wait_for(lambda: self._users.get(id(slot), 0) == 0)
        try:
            timer.stage("drain", t_hold)
            dest = self._claim(slot, checked, protect_live=False)
            try:
                staged = self._stream_into(checked, dest, content_hash, timer, detail)
                n = self._load_slot(slot, staged, timer, dict(staged.tensors))
                self._verify(slot, staged, timer)
            except Exception as e:
                self._restore_fast(slot, dest)
                raise _RolledBack(e) from e
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()
            timer.stages["pause"] = time.perf_counter() - t_hold
        return staged, n

    def _restore_fast(self, slot: WeightSlot, dest: Mapping[str, torch.Tensor]) -> None:
        """Bring the last good weights back into the live slot (requests are held); stop serving if that fails."""
        live = self.live
        if live is None:
            with self._cond:
                self._active = None
            return
        if not _ptrs(live.tensors) & _ptrs(dest):  # they are intact elsewhere (e.g. on the host)
            self._restore_in_place(slot)
            return
        try:
            checked = open_checkpoint(Path(live.source), self.engine.weight_specs(), policy=self.checkpoint_policy,
                                      validation=self.validation_policy, version=live.version,
                                      ignored=getattr(self.engine, "ignored_names", frozenset()))
            read_checked(checked, policy=self.checkpoint_policy, validation=self.validation_policy,
                         out=dest, reader=self._fast_reader())
            self._refit_slot(slot, {**live.tensors, **dest})
            self._contents[id(slot)] = dict(live.tensors)
        except Exception as e:
            log.critical("in-place restore of %s from %s failed; the model stops serving: %s",
                         live.version, live.source, e)
            with self._cond:
                self._active = None
            self.live = None
            raise RefitError(f"restoring the last good weights from {live.source} failed: {e}") from e

    # ------------------------------------------------------------------ strategies
    def _changed(self, slot: WeightSlot, staged: StagedWeights) -> dict[str, torch.Tensor]:
        held = self._contents.get(id(slot))
        if held is None:
            return dict(staged.tensors)
        return {k: v for k, v in staged.tensors.items() if held.get(k) is not v}

    def _load_slot(self, slot: WeightSlot, staged: StagedWeights, timer: _Timer,
                   transferred: dict[str, torch.Tensor] | None = None) -> int:
        """Transfer (unless done) and refit the tensors ``slot`` does not hold yet."""
        t = time.perf_counter()
        changed = self._changed(slot, staged)
        if transferred is None:
            transferred = slot.transfer(changed)
            t = timer.stage("transfer", t)
        self._contents[id(slot)] = None  # unknown until the refit completes
        self._refit_slot(slot, transferred)
        timer.stage("refit", t)
        self._contents[id(slot)] = dict(staged.tensors)
        return len(changed)

    def _refit_slot(self, slot: WeightSlot, transferred: Mapping[str, torch.Tensor]) -> None:
        """Refit, and remember which tensors the slot now runs with (the fast path reuses them)."""
        try:
            slot.refit(transferred)
        finally:  # even a failed refit may have pointed the slot at some of them
            own = slot.buffers()  # a slot that copies into buffers of its own runs with those
            self._buffers[id(slot)] = dict(own) if own else {**self._buffers.get(id(slot), {}), **transferred}

    def _verify(self, slot: WeightSlot, staged: StagedWeights, timer: _Timer) -> None:
        if self.canary.mode == "off":
            return
        t = time.perf_counter()
        try:
            outputs = slot.run(self._canary_inputs)
            expected = self._reference_outputs(staged) if self.canary.mode == "reference" else None
            check_canary(outputs, expected, self.canary, staged.version)
        finally:
            timer.stage("verify", t)

    def _reference_outputs(self, staged: StagedWeights) -> list[torch.Tensor]:
        if self._reference is None:
            assert self._reference_factory is not None
            self._reference = self._reference_factory().eval()
        ref = self._reference
        device = next((p.device for p in ref.parameters()), torch.device("cpu"))
        weights = {k: v.to(device) for k, v in staged.tensors.items()}
        with torch.inference_mode():
            out = torch.func.functional_call(ref, weights, tuple(x.to(device) for x in self._canary_inputs))
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def _free_standby(self, timer: _Timer) -> WeightSlot:
        """The standby slot (made on first use), once every request that started on it has finished."""
        if self._standby is None:
            self._standby = self.engine.new_slot()
            self._contents[id(self._standby)] = None
        standby = self._standby
        t = time.perf_counter()
        with self._cond:  # requests that started on it before the last swap must finish first
            self._cond.wait_for(lambda: self._users.get(id(standby), 0) == 0)
        timer.stage("drain", t)
        return standby

    def _install_double_buffer(self, staged: StagedWeights, timer: _Timer) -> int:
        standby = self._free_standby(timer)
        n = self._load_slot(standby, staged, timer)
        self._verify(standby, staged, timer)
        t = time.perf_counter()
        with self._cond:
            self._standby, self._active = self._active, standby
        timer.stage("swap", t)
        timer.stages["pause"] = timer.stages["swap"]  # the only moment requests wait
        return n

    def _install_in_place(self, staged: StagedWeights, timer: _Timer) -> int:
        if self._active is None:
            slot = self.engine.new_slot()
            self._contents[id(slot)] = None
            n = self._load_slot(slot, staged, timer)
            self._verify(slot, staged, timer)
            with self._cond:
                self._active = slot
            return n
        slot = self._active
        t = time.perf_counter()
        changed = self._changed(slot, staged)
        transferred = slot.transfer(changed)
        t = timer.stage("transfer", t)
        with self._cond:
            self._held = True
            self._cond.wait_for(lambda: self._users.get(id(slot), 0) == 0)
        try:
            timer.stage("swap", t)
            try:
                self._load_slot(slot, staged, timer, transferred)
                self._verify(slot, staged, timer)
            except Exception:
                self._restore_in_place(slot)
                raise
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()
            timer.stages["pause"] = time.perf_counter() - t
        return len(changed)

    def _restore_in_place(self, slot: WeightSlot) -> None:
        """Put the last good weights back into the live slot; if that fails too, stop serving."""
        if self.live is None:
            with self._cond:
                self._active = None
            return
        try:
            restore = self._changed(slot, self.live)
            self._refit_slot(slot, slot.transfer(restore))
            self._contents[id(slot)] = dict(self.live.tensors)
        except Exception as e:
            log.critical("in-place restore of %s failed; the model stops serving: %s", self.live.version, e)
            with self._cond:
                self._active = None
            self.live = None
            raise RefitError(f"restoring the last good weights failed: {e}") from e

    # ------------------------------------------------------------------ reports
    def _rejected(self, version: str, err: HotswapError, timer: _Timer) -> RefitReport:
        return self._finish(RefitReport("rejected", version, self.live_version, timer.finish(),
                                        err.reason, str(err)))

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
        with self._cond:
            slots = [s for s in (self._active, self._standby) if s is not None]
            self._active = self._standby = None
        for s in slots:
            s.close()
        self._buffers.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
