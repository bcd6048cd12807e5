"""The small interface every engine implements.

An engine is built once (from the stripped-engine cache when it can) and then hands out
*slots*: runnable copies of the compiled model, each with its own weight set. The refit
coordinator double-buffers with two slots (refit the standby one off the serving path,
then switch a pointer) or refits a single slot in place under a lock.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from serving.errors import EngineBuildError, EngineUnavailableError
from serving.specs import BuildSpec, WeightSpec, dtype_name


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


class Engine(abc.ABC):
    """A compiled model whose weights can be replaced without a rebuild."""

    kind: str = "abstract"

    def __init__(self, device: torch.device, build_info: BuildInfo) -> None:
        self.device = device
        self.build_info = build_info

    @abc.abstractmethod
    def weight_specs(self) -> Mapping[str, WeightSpec]:
        """Every refittable tensor, keyed by checkpoint (state-dict) name."""

    @abc.abstractmethod
    def new_slot(self) -> WeightSlot:
        """A fresh runnable copy with no weights yet (it must not be run before its first refit)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine-wide resources."""
