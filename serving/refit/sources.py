"""Where a refit's weights come from, and how they reach a slot's device.

What a source does for the pipeline (the strategy decides when, and for which slot):

* :meth:`~WeightSource.open`: read (host path) or check (fast path) the checkpoint, off the lock;
* :meth:`~WeightSource.check`: refuse a weight set that cannot be installed;
* :meth:`~WeightSource.ahead`: work an in-place refit does before it holds requests;
* :meth:`~WeightSource.write`: put the weights on a slot's device, ready for its refit, and say in
  :attr:`~WeightSource.overwritten` which tensors it wrote over.

:class:`StagedSource` installs a weight set from memory (a LoRA merge, a rollback); :class:`HostSource`
reads a checkpoint into host tensors first; :class:`FastSource` streams it straight into the tensors
a slot will run with (:mod:`serving.weights.fastpath`). A source raises
:class:`~serving.refit.report.Refused` when the weights are bad; anything else it raises is a failure.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.engines.base import Engine, WeightSlot
from serving.errors import RefitError
from serving.refit.report import Refused, StagedWeights, StageTimer, refusing
from serving.refit.slots import Slots
from serving.weights import CheckpointPolicy, ValidationPolicy, load_weights
from serving.weights.fastpath import FastReader, read_checkpoint_into
from serving.weights.loader import CheckedCheckpoint, open_checkpoint, read_checked


@dataclass(frozen=True)
class Written:
    """Weights on a slot's device: what to refit it with, and how many tensors that changes."""

    staged: StagedWeights
    tensors: Mapping[str, torch.Tensor]
    count: int


class WeightSource(abc.ABC):
    """One refit's weights (a source is used for one refit)."""

    def __init__(self, version: str, content_hash: str | None) -> None:
        self.version = version
        self.content_hash = content_hash
        #: figures for the report (the fast path: bytes, where the streaming time went, GB/s)
        self.detail: dict[str, float] = {}
        #: tensors the write went into that held weights before (their old content is gone)
        self.overwritten: Mapping[str, torch.Tensor] = {}

    def open(self, timer: StageTimer) -> None:  # noqa: B027 - optional step
        """Read or check the weights; called before the refit lock is taken."""

    def check(self, engine: Engine) -> None:  # noqa: B027 - optional step
        """Refuse a weight set that cannot be installed; called under the refit lock."""

    def ahead(self, slot: WeightSlot, slots: Slots, timer: StageTimer) -> None:  # noqa: B027 - optional step
        """In place: what can be done for ``slot`` before requests are held."""

    @abc.abstractmethod
    def write(self, slot: WeightSlot, slots: Slots, keep: set[int], timer: StageTimer) -> Written:
        """The weights on ``slot``'s device, never in the memory ``keep`` names."""


class StagedSource(WeightSource):
    """A weight set in host memory: the slot gets the tensors it does not hold yet."""

    def __init__(self, staged: StagedWeights) -> None:
        super().__init__(staged.version, staged.content_hash)
        self.staged = staged
        self._ahead: tuple[WeightSlot, Written] | None = None

    def check(self, engine: Engine) -> None:
        missing = sorted(set(engine.weight_specs()) - set(self.staged.tensors))
        if missing:
            where = self.staged.source or self.staged.version
            raise Refused(RefitError(f"{where}: weight set incomplete, missing {missing[:10]}"))

    def ahead(self, slot: WeightSlot, slots: Slots, timer: StageTimer) -> None:
        """Transfer before requests are held: the hold then covers only the refit."""
        self._ahead = (slot, self.write(slot, slots, set(), timer))

    def write(self, slot: WeightSlot, slots: Slots, keep: set[int], timer: StageTimer) -> Written:
        if self._ahead is not None and self._ahead[0] is slot:
            return self._ahead[1]
        changed = slots.changed(slot, self.staged)
        with timer.stage("transfer"):
            tensors = slot.transfer(changed)
        return Written(self.staged, tensors, len(changed))


class HostSource(WeightSource):
    """A checkpoint read and validated into fresh host tensors; once read, a weight set in memory."""

    def __init__(self, path: Path, version: str | None, content_hash: str | None, *, engine: Engine,
                 policy: CheckpointPolicy, validation: ValidationPolicy) -> None:
        super().__init__(version or path.name, content_hash)
        self.path, self._requested = path, version
        self.engine, self.policy, self.validation = engine, policy, validation
        self._memory: StagedSource | None = None

    def open(self, timer: StageTimer) -> None:
        with refusing():
            loaded = load_weights(self.path, self.engine.weight_specs(), policy=self.policy,
                                  validation=self.validation, version=self._requested,
                                  ignored=self.engine.ignored_names, fixed=self.engine.kept_tensors)
        timer.add("read", loaded.read_s)
        timer.add("validate", loaded.validate_s)
        self._memory = StagedSource(StagedWeights.from_loaded(loaded, self.content_hash))
        self.version = loaded.version

    @property
    def memory(self) -> StagedSource:
        assert self._memory is not None, "open() first"
        return self._memory

    def check(self, engine: Engine) -> None:
        self.memory.check(engine)

    def ahead(self, slot: WeightSlot, slots: Slots, timer: StageTimer) -> None:
        self.memory.ahead(slot, slots, timer)

    def write(self, slot: WeightSlot, slots: Slots, keep: set[int], timer: StageTimer) -> Written:
        return self.memory.write(slot, slots, keep, timer)


class FastSource(WeightSource):
    """A safetensors checkpoint streamed straight into the tensors a slot will run with."""

    def __init__(self, path: Path, version: str | None, content_hash: str | None, *, engine: Engine,
                 policy: CheckpointPolicy, validation: ValidationPolicy, reader: Callable[[], FastReader],
                 prescan: bool = True) -> None:
        super().__init__(version or path.name, content_hash)
        self.path, self._requested = path, version
        self.engine, self.policy, self.validation = engine, policy, validation
        self._reader = reader
        self.prescan = prescan
        self._checked: CheckedCheckpoint | None = None

    @property
    def checked(self) -> CheckedCheckpoint:
        assert self._checked is not None, "open() first"
        return self._checked

    def open(self, timer: StageTimer) -> None:
        with refusing():
            self._checked = open_checkpoint(
                self.path, self.engine.weight_specs(), policy=self.policy, validation=self.validation,
                version=self._requested, ignored=self.engine.ignored_names, fixed=self.engine.kept_tensors)
        timer.add("read", self.checked.open_s)
        timer.add("validate", self.checked.check_s)
        self.version = self.checked.version
        self.detail["bytes"] = float(self.checked.nbytes)

    def ahead(self, slot: WeightSlot, slots: Slots, timer: StageTimer) -> None:
        """Refuse NaN/Inf (and a file that changes) before the live tensors are touched."""
        if not self.prescan:
            return
        c = self.checked
        with timer.stage("prescan"), refusing():
            stats = read_checkpoint_into(c.candidate, c.metas, c.specs, c.needed, None,
                                         reader=self._reader(), device=self.engine.device)
        self.detail["prescan_gbps"] = stats.gbps

    def write(self, slot: WeightSlot, slots: Slots, keep: set[int], timer: StageTimer) -> Written:
        dest = slots.claim(slot, self.checked.specs, self.checked.needed, keep)
        staged = self.fill(dest, timer)
        return Written(staged, dict(staged.tensors), len(staged.tensors))

    def fill(self, dest: Mapping[str, torch.Tensor], timer: StageTimer) -> StagedWeights:
        """Stream the checkpoint into ``dest`` (its old content is gone, even when this raises)."""
        self.overwritten = dest
        with refusing():
            loaded = read_checked(self.checked, policy=self.policy, validation=self.validation,
                                  out=dest, reader=self._reader())
        stats = loaded.stats
        if stats is not None:
            timer.add("transfer", stats.seconds - stats.finish_s)
            timer.add("validate", stats.finish_s)
            self.detail.update(wait_read_s=stats.wait_read_s, wait_copy_s=stats.wait_copy_s,
                               stream_s=stats.seconds, stream_gbps=stats.gbps, **stats.extra)
        return StagedWeights.from_loaded(loaded, self.content_hash)
