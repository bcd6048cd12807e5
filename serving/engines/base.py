"""The interface every engine implements, and what engines share.

An engine is built once (from the stripped-engine cache when it can) and then hands out *slots*:
runnable copies of the compiled model, each with its own weight set. The refit coordinator
double-buffers with two slots (refit the standby one off the serving path, then switch a pointer)
or refits a single slot in place under a lock.

A new engine provides:

* an :class:`Engine` subclass with a ``kind`` (its name in ``ENGINES``, ``serving/engines/__init__.py``),
  :meth:`Engine.build` (the one signature every engine has; it starts with :func:`build_device`),
  :meth:`Engine.weight_specs` and :meth:`Engine.new_slot`, and, where the engine has them,
  :attr:`Engine.ignored_names` and :attr:`Engine.kept_tensors`;
* a :class:`WeightSlot` subclass: :meth:`~WeightSlot.transfer`, :meth:`~WeightSlot.refit` (checked
  with :func:`weight_problems`) and :meth:`~WeightSlot.run`. A slot whose weights are tensors of its
  own at fixed addresses subclasses :class:`CopySlot`, which does both for it;
* a check at build time that every checkpoint tensor is refittable (nothing baked into the code).

(The TensorRT engine checks its device together with TensorRT itself, in
:func:`~serving.engines.tensorrt.environment.probe_environment`, which says what to install, and a weight
set against its weight map, which also counts what earlier partial refits installed.)

A compiled engine that stores its build in the stripped-engine cache describes the build as a
recipe for :func:`serving.engines.cached_build.cached_build`, which owns the cache-or-compile flow.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

import torch

from serving.errors import EngineBuildError, EngineUnavailableError, RefitError, ValidationError
from serving.specs import BuildSpec, WeightSpec, dtype_name

if TYPE_CHECKING:
    from serving.cache import EngineCache
    from serving.metrics import HotswapMetrics


def build_device(spec: BuildSpec, engine: str) -> torch.device:
    """The device a build asks for; an invalid one, or CUDA where this torch has none, fails the build naming
    ``engine`` (e.g. "AOTI engine")."""
    try:
        device = torch.device(spec.device)
    except RuntimeError as e:
        raise EngineBuildError(f"{engine}: invalid device {spec.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailableError(
            f"{engine}: device {spec.device!r} asked for, but this torch has no usable CUDA "
            f"(torch {torch.__version__}); install a CUDA build of torch or use device 'cpu'")
    return device


def weight_problems(specs: Mapping[str, WeightSpec], weights: Mapping[str, torch.Tensor], device: torch.device,
                    *, full: bool, ignored: frozenset[str] = frozenset(),
                    extra: Callable[[str, torch.Tensor], list[str]] | None = None) -> list[str]:
    """Everything wrong with a weight set for a slot (all of it, not only the first problem): unknown names
    (except ``ignored`` ones), shapes, dtypes, device types, what ``extra`` finds in a tensor, and, for a
    slot's first refit (``full``), missing names. Pure."""
    problems: list[str] = []
    for name, t in weights.items():
        spec = specs.get(name)
        if spec is None:
            if name not in ignored:
                problems.append(f"{name!r}: not a weight of this engine")
            continue
        if tuple(t.shape) != spec.shape:
            problems.append(f"{name!r}: shape {tuple(t.shape)}, expected {spec.shape}")
        if t.dtype != spec.dtype:
            problems.append(f"{name!r}: dtype {dtype_name(t.dtype)}, expected {dtype_name(spec.dtype)}")
        if t.device.type != device.type:
            problems.append(f"{name!r}: on {t.device}, expected {device} (call transfer() first)")
        if extra is not None:
            problems += extra(name, t)
    if full:
        missing = [n for n in specs if n not in weights]
        if missing:
            problems.append(f"the first refit of a slot must provide every weight; missing {len(missing)}: "
                            + ", ".join(repr(n) for n in missing))
    return problems


@dataclass(frozen=True)
class BuildInfo:
    """How the engine came to be: from the cache or built now, and how long it took."""

    cache: str  # "hit", "miss" (built and stored), "bypass" (engine has nothing to cache)
    seconds: float
    key: str | None = None
    detail: str = ""


class WeightSlot(abc.ABC):
    """One runnable copy of the engine with its own set of weights."""

    @abc.abstractmethod
    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring validated host tensors to the engine's device and dtype (off the serving path)."""

    @abc.abstractmethod
    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Install transferred weights into this slot.

        The first refit of a slot must cover every weight spec; later ones may be partial
        (only the tensors that changed, e.g. a LoRA merge). Not thread-safe against
        :meth:`run` on the same slot: the coordinator serializes them.
        """

    @abc.abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run inference with this slot's weights. Inputs are batched, on any device."""

    def buffers(self) -> Mapping[str, torch.Tensor]:
        """The slot's own weight tensors, which a loader may write new weights into directly (then a
        refit with those same tensors makes them live without another copy). Empty: no such tensors.

        Only written while the slot is not serving (standby) or while requests are held (in place).
        """
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the slot holds."""


def to_engine(t: torch.Tensor, spec: WeightSpec | None, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, a floating tensor in its spec's floating dtype; no copy when already so."""
    convert = spec is not None and t.is_floating_point() and spec.dtype.is_floating_point
    return t.to(device=device, dtype=spec.dtype if convert and spec is not None else t.dtype)


class CopySlot(WeightSlot):
    """A slot whose weights are tensors of its own at fixed addresses (:meth:`buffers`); a refit copies into them.

    Compiled code (and captured CUDA graphs) read those addresses, so a refit changes what the next run
    computes and never moves a tensor. A subclass gives :meth:`buffers`, and may add per-tensor checks
    (:meth:`tensor_problems`), reshape what :meth:`transfer` returns (:meth:`prepare`) and act once the
    copies are done (:meth:`installed`).
    """

    def __init__(self, label: str, specs: Mapping[str, WeightSpec], device: torch.device,
                 ignored: frozenset[str] = frozenset()) -> None:
        self.label = label  # "AOTI engine <factory>": names the engine in errors
        self.specs = specs
        self.device = device
        self.ignored = ignored
        self._ready = False

    @property
    def ready(self) -> bool:
        """Whether the slot holds a complete weight set (it may run)."""
        return self._ready

    def reset(self) -> None:
        """Mark the slot as holding no weights (its next refit must be complete)."""
        self._ready = False

    def tensor_problems(self, name: str, t: torch.Tensor) -> list[str]:
        """What else a tensor must be for this slot (beyond :func:`weight_problems`)."""
        return []

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """A transferred tensor made ready for :meth:`refit` (default: as it is)."""
        return t

    def installed(self, buffers: Mapping[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Called after a refit's copies, before the slot counts as ready; raising fails the refit."""

    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights on the engine device, floating ones in the engine dtype; no copy when already so.

        Ignored names are dropped; unknown names pass through for :meth:`refit` to report.
        """
        return {name: self.prepare(to_engine(t, self.specs.get(name), self.device))
                for name, t in weights.items() if name not in self.ignored}

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights`` into this slot's buffers (tensors that already are the buffers, because a loader
        wrote into :meth:`buffers`, are not copied); the caller's tensors may be freed afterwards.

        The first refit must be complete; a later one may be partial (the buffers keep the rest). Nothing is
        copied when the weights have a problem; a failure while copying leaves the slot needing a full refit.
        """
        problems = weight_problems(self.specs, weights, self.device, full=not self._ready, ignored=self.ignored,
                                   extra=self.tensor_problems)
        if problems:
            raise ValidationError(f"refit of {self.label}", problems)
        buffers = self.buffers()
        try:
            with torch.no_grad():
                for name, t in weights.items():
                    if name in self.ignored:
                        continue
                    dest = buffers[name]
                    if dest.numel() and t.data_ptr() == dest.data_ptr():
                        continue  # written in place by the loader
                    dest.copy_(t)
            self.installed(buffers)
        except Exception as e:
            self._ready = False  # part of the update may be in: not a consistent weight set
            raise RefitError(f"{self.label}: refit failed ({e}); this slot needs a full refit before it can "
                             "run again") from e
        self._ready = True


class Engine(abc.ABC):
    """A compiled model whose weights can be replaced without a rebuild."""

    #: the engine's name in ``ENGINES`` and in the cache key
    kind: ClassVar[str] = "abstract"
    #: state-dict names that are not weights of the engine (e.g. BatchNorm ``num_batches_tracked``, which a
    #: compiled graph never reads in eval mode): a checkpoint may carry them, the loader accepts and drops them
    ignored_names: frozenset[str] = frozenset()
    #: tensors the model reads that no checkpoint provides (non-persistent buffers, constants created while
    #: tracing): part of the engine, never refitted; a checkpoint that carries one must hold the same value
    #: (``fixed`` of :func:`~serving.weights.loader.open_checkpoint`)
    kept_tensors: Mapping[str, torch.Tensor] = MappingProxyType({})

    def __init__(self, device: torch.device, build_info: BuildInfo) -> None:
        self.device = device
        self.build_info = build_info

    @classmethod
    @abc.abstractmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None = None,
              metrics: HotswapMetrics | None = None) -> Engine:
        """Build the engine of ``spec`` (from ``cache`` when it holds this build), checked to be refittable.

        Raises :class:`~serving.errors.EngineUnavailableError` when the engine cannot run here and
        :class:`~serving.errors.EngineBuildError` when the model cannot be served by it. ``metrics`` counts
        what the engine measures itself (the cache counts its own events).
        """

    @abc.abstractmethod
    def weight_specs(self) -> Mapping[str, WeightSpec]:
        """Every refittable tensor, keyed by checkpoint (state-dict) name."""

    @abc.abstractmethod
    def new_slot(self) -> WeightSlot:
        """A fresh runnable copy with no weights yet (it must not be run before its first refit)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine-wide resources."""
