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
:meth:`RefitCoordinator.rollback` is one call. The fast path (the default on CUDA, and on the CPU
when double-buffered: :func:`~serving.refit.coordinator.fast_path_default`) makes the staged weights
the slot's own tensors, so a slot's transfer and refit copy nothing. What each strategy writes, what
it keeps and what requests see: see serving/refit/strategies.py.
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
