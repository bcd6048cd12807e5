"""The steps one refit is made of, each timed under its stage name; a strategy puts them in order."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from serving.engines.base import WeightSlot
from serving.errors import CanaryError, RefitError
from serving.refit.canary import Canary
from serving.refit.memory import allocating, weights_nbytes
from serving.refit.report import Refused, StagedWeights, StageTimer
from serving.refit.slots import Slots, ptrs
from serving.refit.sources import FastSource, WeightSource, Written

log = logging.getLogger(__name__)


class Steps:
    """One refit of ``source``'s weights while ``live`` serves."""

    def __init__(self, slots: Slots, source: WeightSource, timer: StageTimer, canary: Canary,
                 live: StagedWeights | None, reopen: Callable[[StagedWeights], FastSource]) -> None:
        """``reopen``: a fast source for the file ``live`` came from (to restore its overwritten tensors)."""
        self.slots = slots
        self.source = source
        self.timer = timer
        self.canary = canary
        self.live = live
        self._reopen = reopen
        #: the last good weights could not be restored: nothing serves and nothing is live
        self.live_lost = False

    def standby(self) -> WeightSlot:
        """The standby slot (made on first use: the second copy of the weights, or the first when nothing serves
        yet), once no request runs on it."""
        first = self.slots.active is None
        what = "the first copy of the weights" if first else "the standby copy of the weights"
        with self.timer.stage("drain"), self._allocating(what, two_copies=not first):
            return self.slots.free_standby()

    def ahead(self, slot: WeightSlot) -> None:
        self.source.ahead(slot, self.slots, self.timer)

    def write(self, slot: WeightSlot, *, protect_live: bool) -> Written:
        """The new weights on ``slot``'s device; with ``protect_live``, never in memory another slot
        runs with or the live weights are."""
        keep: set[int] = set()
        if protect_live:
            keep = ptrs(self.live.tensors if self.live else None) | self.slots.others_buffers(slot)
        with self._allocating("the new weights on the slot's device", two_copies=protect_live):
            return self.source.write(slot, self.slots, keep, self.timer)

    def _allocating(self, what: str, *, two_copies: bool) -> contextlib.AbstractContextManager[None]:
        engine = self.slots.engine
        fix = ("Free memory there, or set refit_strategy=in_place (one copy of the weights instead of two)"
               if two_copies else "Free memory there")
        return allocating(what, engine.device, weights_nbytes(engine.weight_specs()), fix)

    def refit(self, slot: WeightSlot, written: Written) -> None:
        with self.timer.stage("refit"):
            self.slots.refit(slot, written.tensors, written.staged)

    def verify(self, slot: WeightSlot, staged: StagedWeights) -> None:
        if not self.canary.enabled:
            return
        with self.timer.stage("verify"):
            try:
                self.canary.check(slot, staged)
            except CanaryError as e:
                raise Refused(e) from e

    def swap(self, slot: WeightSlot) -> None:
        with self.timer.stage("swap"):
            self.slots.swap(slot)
        self.timer.add("pause", self.timer.stages["swap"])  # the only moment requests wait

    @contextlib.contextmanager
    def holding(self, slot: WeightSlot) -> Iterator[None]:
        """New requests wait, running ones drain; on exit they resume (on whatever ``slot`` holds then)."""
        t = time.perf_counter()
        with self.timer.stage("drain"):
            self.slots.hold(slot)
        try:
            yield
        finally:
            with self.timer.stage("swap"):
                self.slots.release()
            self.timer.add("pause", time.perf_counter() - t)

    def restore(self, slot: WeightSlot) -> bool:
        """Put the last good weights back into the live ``slot`` (requests are held); False: there are
        none, and the slot stops serving. Raises :class:`RefitError` when that fails too: serving
        garbage is worse than not serving, so the slot stops serving and nothing is live."""
        live = self.live
        if live is None:
            self.slots.stop()
            return False
        overwritten = self.source.overwritten
        from_file = bool(ptrs(live.tensors) & ptrs(overwritten))
        try:
            if from_file:  # its tensors were written over: stream its file back into them
                again = self._reopen(live)
                scratch = StageTimer()
                again.open(scratch)
                again.fill(overwritten, scratch)
                self.slots.refit(slot, {**live.tensors, **overwritten}, live)
            else:  # intact elsewhere (on the host): transfer what the slot no longer holds
                self.slots.refit(slot, slot.transfer(self.slots.changed(slot, live)), live)
        except Exception as e:
            where = f" (re-reading {live.source})" if from_file else ""
            log.critical("in-place restore of %s%s failed; the model stops serving: %s", live.version, where, e)
            self.slots.stop()
            self.live_lost = True
            raise RefitError(f"restoring the last good weights failed{where}: {e}") from e
        return True
