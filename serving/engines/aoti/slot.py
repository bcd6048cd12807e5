"""An AOTI slot: one loaded runner whose constants are the slot's own buffers, registered once.

The buffers are allocated once and registered with the runner once, with
``load_constants(..., user_managed=True)`` (the runner points at them); every refit then only writes
into them, and a loader may write into them directly (:meth:`AOTISlot.buffers`), so a refit costs no
copy at all. Registering new tensors on every refit is what must not happen: in torch 2.13 the
user-managed form leaks every tensor it is given (``MaybeOwningAtenTensorHandle(handle, user_managed=true)``
in ``torch/csrc/inductor/aoti_runtime/utils.h`` takes a new handle with ``aoti_torch_new_tensor_handle``
and its destructor never frees it; fixed upstream by pytorch/pytorch#194480; the growth is in
docs/benchmarks.md). Registered once, the buffers live as long as the slot anyway. The copying form,
``user_managed=False``, ``memcpy``s each tensor's whole *storage*, so a view into a larger storage
overruns the blob (heap corruption): :meth:`AOTISlot.refit` refuses such views and
:meth:`AOTISlot.transfer` compacts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from serving.engines.aoti.checks import NOT_HELD_FIX, is_compact, runner_problems
from serving.engines.aoti.runner import Runner
from serving.engines.base import CopySlot
from serving.engines.export import input_problems
from serving.errors import EngineBuildError, NotReadyError, RefitError
from serving.specs import BuildSpec, WeightSpec


class AOTISlot(CopySlot):
    """One loaded runner whose constants are this slot's own buffers (see the module docstring)."""

    def __init__(self, runner: Runner, *, spec: BuildSpec, device: torch.device, specs: Mapping[str, WeightSpec],
                 ignored: frozenset[str], constants: Mapping[str, torch.Tensor]) -> None:
        super().__init__(f"AOTI engine {spec.factory}", specs, device, ignored)
        self.spec = spec
        self._runner: Runner | None = runner
        #: the kept tensors the compiled model reads, registered with the weights
        self._constants = constants
        self._registered = False
        self._buffers: dict[str, torch.Tensor] | None = None

    def buffers(self) -> Mapping[str, torch.Tensor]:
        if self._buffers is None:
            self._buffers = {n: torch.empty(s.shape, dtype=s.dtype, device=self.device) for n, s in self.specs.items()}
        return self._buffers

    def tensor_problems(self, name: str, t: torch.Tensor) -> list[str]:
        return runner_problems(self.device)(name, t)

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """A view into a larger storage is cloned: the runner copies whole storages (module docstring)."""
        return t if is_compact(t) else t.clone(memory_format=torch.contiguous_format)

    def installed(self, buffers: Mapping[str, torch.Tensor]) -> None:
        if not self._registered:
            assert self._runner is not None
            self._runner.load_constants({**self._constants, **buffers}, check_full_update=True, user_managed=True)
            self._registered = True

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        if self._runner is None:
            raise NotReadyError("AOTI slot is closed")
        super().refit(weights)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.ready or self._runner is None:
            # a stripped runner without constants reads null pointers (it segfaults)
            raise NotReadyError(f"AOTI engine {self.spec.factory}: this slot has no weights yet; refit it first")
        # the compiled code does not check shapes itself (AOTI_RUNTIME_CHECK_INPUTS is off by default): a wrong
        # shape would read out of bounds
        problems = input_problems(self.spec, inputs)
        if problems:
            raise ValueError("AOTI engine inputs: " + "; ".join(problems))
        xs = [x.to(self.device).contiguous() for x in inputs]
        with torch.no_grad():
            out = self._runner(*xs)
        return list(pytree.tree_leaves(out))

    def close(self) -> None:
        self._runner = None
        self.reset()


def first_refit_check(slot: AOTISlot) -> None:
    """Refit ``slot`` once through the call serving makes, so that an engine that builds cannot fail at its first
    refit; the slot then needs a full refit again.

    The slot is refitted with its own buffers (nothing is copied; their values do not matter), which registers
    them, and the kept tensors, with the runner: the runner checks that every constant it reads is given.
    """
    try:
        slot.refit(slot.buffers())
    except RefitError as e:
        raise EngineBuildError(f"AOTI engine for {slot.spec.factory}: the compiled model does not take the weights "
                               f"and kept tensors as serving installs them ({e.__cause__ or e}); {NOT_HELD_FIX}") from e
    finally:
        slot.reset()


__all__ = ["AOTISlot", "first_refit_check"]
