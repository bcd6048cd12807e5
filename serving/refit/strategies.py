"""The two refit strategies: where new weights are written, and when requests see them.

This is the one account of the two and of the trade-off between them (memory against the pause);
the settings, the engines, the fast path and the README point here.

``double_buffer`` (default)
    Two slots of the engine, so two device copies of the weights, and no third. New weights are
    written into the *standby* slot and refitted there while the *active* slot keeps serving; the
    canary runs on the standby slot; then a pointer switch under a lock makes it active. A request
    runs entirely on one slot, and a slot is only written once every request that started on it
    has finished. The fast path streams the checkpoint straight into the standby slot's tensors
    (allocated once, then reused; never tensors the live slot reads), so the peak is the two copies
    plus one chunk of scratch. The previous version stays in the standby slot until the next refit
    starts overwriting it: a rollback is a pointer switch too.

``in_place``
    One slot, so one device copy: for models too large for two (larger than half the GPU). What can
    be done off the serving path is done first (the host path transfers the new tensors; the fast
    path reads the checkpoint once and checks it, NaN/Inf and cast overflow, without keeping it),
    then new requests are held, running ones drain, the slot is written (the fast path streams the
    checkpoint again, straight into the live tensors), refitted and verified, and serving resumes:
    the pause is one pass of the file to the device, not a device-side copy. A failure once the
    slot was written restores the last good weights before serving resumes, streamed back from
    their own checkpoint file; so no second copy is kept anywhere, and the previous version is
    remembered as a file that :meth:`~serving.refit.RefitCoordinator.rollback` reads again. Live
    weights that are no file's content (a LoRA merge) are never overwritten this way: such a
    refit takes the host path. Reading the file twice was chosen over staging the whole
    checkpoint in pinned host memory first, which would shorten the pause to a pinned copy but
    needs pinned memory as large as the model (memory that cannot be paged, and time to pin it).

Either way a slot remembers which host tensors it holds, so only the tensors that differ are
transferred and refitted (a LoRA merge touches a few). The pauses and rates measured for both are
in docs/gpu.md.
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
