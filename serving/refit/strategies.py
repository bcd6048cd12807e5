"""The two refit strategies: where new weights are written, and when requests see them.

``double_buffer`` (default)
    Two slots of the engine. New weights are written into the *standby* slot and refitted there
    while the *active* slot keeps serving; the canary runs on the standby slot; then a pointer
    switch under a lock makes it active. A request runs entirely on one slot, and a slot is only
    written once every request that started on it has finished.

``in_place``
    One slot, for models too large for two copies. What can be done off the serving path is done
    first (the host path transfers the new tensors; the fast path reads and checks the checkpoint
    once), then new requests are held, running ones drain, the slot is written, refitted and
    verified, and serving resumes. A failure once the slot was written restores the last good
    weights before serving resumes.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from serving.choices import STRATEGIES
from serving.errors import ConfigError
from serving.refit.report import RolledBack
from serving.refit.sources import Written
from serving.refit.steps import Steps


class Strategy(Protocol):
    name: ClassVar[str]
    #: whether a refit writes the tensors the live slot runs with
    overwrites_live: ClassVar[bool]

    def install(self, steps: Steps) -> Written:
        """Make the source's weights serve, or raise with the previous weights still serving."""
        ...


class DoubleBuffer:
    name: ClassVar[str] = "double_buffer"
    overwrites_live: ClassVar[bool] = False

    def install(self, steps: Steps) -> Written:
        slot = steps.standby()
        written = steps.write(slot, protect_live=True)
        steps.refit(slot, written)
        steps.verify(slot, written.staged)
        steps.swap(slot)
        return written


class InPlace:
    name: ClassVar[str] = "in_place"
    overwrites_live: ClassVar[bool] = True

    def install(self, steps: Steps) -> Written:
        slot = steps.slots.active
        if slot is None:  # nothing serves yet: nothing to hold, nothing to restore
            slot = steps.slots.new()
            written = steps.write(slot, protect_live=False)
            steps.refit(slot, written)
            steps.verify(slot, written.staged)
            steps.slots.activate(slot)
            return written
        steps.ahead(slot)
        with steps.holding(slot):
            try:
                written = steps.write(slot, protect_live=False)
                steps.refit(slot, written)
                steps.verify(slot, written.staged)
            except Exception as e:
                if steps.restore(slot):
                    raise RolledBack(e) from e
                raise
        return written


def strategy_named(name: str) -> Strategy:
    for cls in (DoubleBuffer, InPlace):
        if cls.name == name:
            return cls()
    raise ConfigError(f"refit_strategy {name!r}: choose one of {STRATEGIES}")
