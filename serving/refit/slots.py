"""The engine's slots: which one serves, who runs on which, and what each one holds.

Requests and refits meet here, under one condition variable: a request takes the active slot
(:meth:`Slots.acquire`, the only place that happens); a refit waits until no request runs on the
slot it is about to write (:meth:`Slots.drain`, or :meth:`Slots.hold` to also keep new requests
back), then makes it serve (:meth:`Slots.swap`, :meth:`Slots.release`).

Per slot it remembers which host tensors (and version) it holds, so only tensors that differ are
transferred, and which tensors it runs with, so the fast path can write the next weights into them
(:meth:`Slots.claim`) without touching memory anything else reads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from serving.engines.base import Engine, WeightSlot
from serving.errors import NotReadyError
from serving.refit.report import StagedWeights
from serving.specs import WeightSpec


def ptrs(tensors: Mapping[str, torch.Tensor] | None) -> set[int]:
    """Addresses of the tensors' first elements: which memory they are (empty tensors excluded)."""
    return {t.data_ptr() for t in (tensors or {}).values() if t.numel()}


@dataclass(frozen=True)
class Lease:
    """The slot one request runs on, and the version of the weights it holds."""

    slot: WeightSlot
    version: str | None


@dataclass(frozen=True)
class _Holds:
    version: str
    tensors: dict[str, torch.Tensor]


class Slots:
    """The active and the standby slot of an engine, the requests running on each, and their contents."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()  # guards active, standby, _users, _held
        self.active: WeightSlot | None = None
        self.standby: WeightSlot | None = None
        self._users: dict[int, int] = {}  # id(slot) -> requests running on it
        self._held = False  # in place: new requests wait
        self._holds: dict[int, _Holds | None] = {}  # id(slot) -> the host tensors it holds (None: unknown)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # id(slot) -> tensors it was last refitted with

    # ------------------------------------------------------------------ requests
    @contextlib.contextmanager
    def acquire(self) -> Iterator[Lease]:
        """The active slot for one request; it is not written until the request is done."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            slot = self.active
            if slot is None:
                raise NotReadyError("no weights installed yet: the model is not ready")
            holds = self._holds.get(id(slot))
            self._users[id(slot)] = self._users.get(id(slot), 0) + 1
        try:
            yield Lease(slot, holds.version if holds else None)
        finally:
            with self._cond:
                self._users[id(slot)] -= 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ refits
    def new(self) -> WeightSlot:
        slot = self.engine.new_slot()
        self._holds[id(slot)] = None
        return slot

    def free_standby(self) -> WeightSlot:
        """The standby slot (made on first use), once every request that started on it has finished."""
        if self.standby is None:
            self.standby = self.new()
        self.drain(self.standby)
        return self.standby

    def drain(self, slot: WeightSlot) -> None:
        """Wait until no request runs on ``slot`` (requests that started on it before the last swap)."""
        with self._cond:
            self._cond.wait_for(lambda: self._users.get(id(slot), 0) == 0)

    def hold(self, slot: WeightSlot) -> None:
        """Keep new requests back and wait until none runs on ``slot``; :meth:`release` ends it."""
        with self._cond:
            self._held = True
            self._cond.wait_for(lambda: self._users.get(id(slot), 0) == 0)

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def activate(self, slot: WeightSlot) -> None:
        """Make ``slot`` serve (nothing served before)."""
        with self._cond:
            self.active = slot

    def swap(self, slot: WeightSlot) -> None:
        """Make the standby ``slot`` serve; the slot that served becomes the standby."""
        with self._cond:
            self.standby, self.active = self.active, slot

    def stop(self) -> None:
        """Serve nothing: a slot in an unknown state is never run."""
        with self._cond:
            self.active = None

    # ------------------------------------------------------------------ contents
    def changed(self, slot: WeightSlot, staged: StagedWeights) -> dict[str, torch.Tensor]:
        """The tensors of ``staged`` that ``slot`` does not hold already."""
        holds = self._holds.get(id(slot))
        if holds is None:
            return dict(staged.tensors)
        return {k: v for k, v in staged.tensors.items() if holds.tensors.get(k) is not v}

    def refit(self, slot: WeightSlot, transferred: Mapping[str, torch.Tensor], staged: StagedWeights) -> None:
        """Refit ``slot`` with ``transferred`` (its share of ``staged``); then it holds ``staged``."""
        self._holds[id(slot)] = None  # unknown until the refit completes
        try:
            slot.refit(transferred)
        finally:  # even a failed refit may have pointed the slot at some of them
            own = slot.buffers()  # a slot that copies into buffers of its own runs with those
            self._buffers[id(slot)] = dict(own) if own else {**self._buffers.get(id(slot), {}), **transferred}
        self._holds[id(slot)] = _Holds(staged.version, dict(staged.tensors))

    def buffers(self, slot: WeightSlot) -> dict[str, torch.Tensor] | None:
        """The tensors ``slot`` was last refitted with (None: never refitted)."""
        return self._buffers.get(id(slot))

    def others_buffers(self, slot: WeightSlot) -> set[int]:
        """The memory every other slot runs with."""
        out: set[int] = set()
        for sid, tensors in self._buffers.items():
            if sid != id(slot):
                out |= ptrs(tensors)
        return out

    def claim(self, slot: WeightSlot, specs: Mapping[str, WeightSpec], names: tuple[str, ...],
              keep: set[int]) -> dict[str, torch.Tensor]:
        """Tensors to write ``names`` into: the slot's own where they fit and are not in ``keep``, fresh
        ones otherwise. The slot's contents are unknown from here on."""
        device = self.engine.device
        held = self._buffers.get(id(slot))
        if held is None:  # a fresh slot: its own tensors (an eager module's, AOTI's constant buffers)
            held = dict(slot.buffers())
        dest: dict[str, torch.Tensor] = {}
        taken: set[int] = set()
        for name in names:
            spec = specs[name]
            t = held.get(name)
            fits = (t is not None and t.device.type == device.type
                    and (device.index is None or t.device.index == device.index)
                    and t.dtype == spec.dtype and tuple(t.shape) == spec.shape and t.is_contiguous()
                    and (not t.numel() or (t.data_ptr() not in keep and t.data_ptr() not in taken)))
            if fits:
                assert t is not None
                dest[name] = t.detach()
                if t.numel():
                    taken.add(t.data_ptr())
            else:
                dest[name] = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        self._holds[id(slot)] = None
        return dest

    def close(self) -> None:
        """Drop the slots (the engine is closed by its owner)."""
        with self._cond:
            slots = [s for s in (self.active, self.standby) if s is not None]
            self.active = self.standby = None
        for s in slots:
            s.close()
        self._buffers.clear()
