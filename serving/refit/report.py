"""What goes into a refit and what comes out: the weight set, the report, stage timings, and the
one mapping from what went wrong to an outcome and a reason."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from serving.errors import HotswapError
from serving.metrics import STAGES
from serving.weights import LoadedWeights


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


class StageTimer:
    """Seconds per stage of one refit; a stage that runs twice adds up. Only names of
    :data:`serving.metrics.STAGES` are accepted."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        if name not in STAGES:
            raise ValueError(f"refit stage {name!r} is not in serving.metrics.STAGES")
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (also when it raises)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def finish(self) -> dict[str, float]:
        self.stages["total"] = time.perf_counter() - self._t0
        return self.stages


# ---------------------------------------------------------------- what went wrong -> outcome


class Refused(Exception):
    """The weights were refused (their data, or the canary on them); the engine did nothing wrong."""

    def __init__(self, error: HotswapError) -> None:
        super().__init__(str(error))
        self.error = error


class RolledBack(Exception):
    """An in-place refit failed after it had written the live slot; the last good weights were put back."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """Mark an error of the hotswap family raised in the block as a refusal of the weights."""
    try:
        yield
    except HotswapError as e:
        raise Refused(e) from e


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    message: str


def verdict(error: BaseException) -> Verdict:
    """The outcome of a refit that raised ``error``. Pure.

    Refused weights are ``rejected``, or ``rolled_back`` when they had been written into the live slot
    and the last good ones were restored. Anything else is the engine's fault: ``failed`` (the watcher
    tries the file again once it changes), with the error's reason or ``refit_failed``.
    """
    restored = isinstance(error, RolledBack)
    cause = error.error if isinstance(error, RolledBack) else error
    if isinstance(cause, Refused):
        return Verdict("rolled_back" if restored else "rejected", cause.error.reason, str(cause.error))
    reason = cause.reason if isinstance(cause, HotswapError) else "refit_failed"
    return Verdict("failed", reason, f"{type(cause).__name__}: {cause}")
