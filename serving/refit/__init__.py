"""The refit coordinator: stage new weights off the serving path, verify them, swap atomically.

One pipeline (:mod:`~serving.refit.coordinator`) runs every refit: a *weight source* says where the
weights come from and how they reach a slot's device (:mod:`~serving.refit.sources`: a weight set in
memory, a checkpoint read on the host, or the fast path that streams a checkpoint straight into the
tensors a slot will run with); a *strategy* says where they are written and when requests see them
(:mod:`~serving.refit.strategies`: ``double_buffer`` or ``in_place``); the canary checks them
(:mod:`~serving.refit.canary`); whatever goes wrong maps to one outcome and reason
(:func:`~serving.refit.report.verdict`); every stage is timed under a name of
:data:`serving.metrics.STAGES`.

The coordinator keeps the host tensors of the live and the previous version, so
:meth:`RefitCoordinator.rollback` is one call; a slot remembers which host tensors it holds, so only
tensors that differ are transferred and refitted (a LoRA merge touches a few; a rollback in
double-buffer mode is a bare pointer switch).

The fast path (default when the engine is on CUDA; ``fast_path=True`` forces it on the CPU) makes the
staged weights device tensors, so a slot's transfer is free:

* ``double_buffer``: the new weights are written into the standby slot's tensors (reused from one
  refit to the next; never tensors the live slot reads), so two device copies exist and no third.
  The previous version stays in the standby slot until the next refit starts overwriting it:
  rollback is still a pointer switch.
* ``in_place``: the checkpoint is first read and checked off the serving path without being kept
  (NaN/Inf), then requests are held and it is streamed straight into the live tensors. One device
  copy exists. If the new weights fail once written (the canary), the last good ones are streamed
  back from their own file. The previous version is not kept in memory but remembered as a file:
  :meth:`~RefitCoordinator.rollback` re-reads it. Live weights that are no file's content (a LoRA
  merge) are never overwritten this way: such a refit takes the host path.
"""

from __future__ import annotations

from serving.refit.canary import CanaryConfig, canary_inputs, check_canary
from serving.refit.coordinator import RefitCoordinator
from serving.refit.report import RefitReport, StagedWeights

__all__ = [
    "CanaryConfig",
    "RefitCoordinator",
    "RefitReport",
    "StagedWeights",
    "canary_inputs",
    "check_canary",
]
