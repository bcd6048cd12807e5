"""Plain descriptions shared by engines, checkpoints and the cache: tensors, inputs, builds."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from serving.choices import DTYPE_NAMES, dtype_key
from serving.errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"``, ``"torch.float16"`` or ``"fp16"`` -> ``torch.float16``; a clear error otherwise."""
    key = dtype_key(name)
    if key is None:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class WeightSpec:
    """One refittable tensor of an engine, as the checkpoint must provide it.

    ``aliases`` are the other state-dict names of the same tensor (tied parameters, e.g. GPT-2's
    ``lm_head.weight`` and ``transformer.wte.weight``): a checkpoint may provide the tensor under any
    one of ``names``; the engine refits it once.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The name and its aliases, the name first."""
        return (self.name, *self.aliases)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        if self.aliases:
            d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> WeightSpec:
        shape = d["shape"]
        aliases = d.get("aliases", [])
        assert isinstance(shape, list) and isinstance(aliases, list)
        return cls(str(d["name"]), tuple(int(x) for x in shape), dtype_from_name(str(d["dtype"])),
                   tuple(str(a) for a in aliases))


def tie_groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Names of ``state`` that are one tensor (tied parameters), in state order; single names too.

    Pass ``module.state_dict(keep_vars=True)``: tied parameters are then the same object (which holds
    on the meta device too, where there is no storage to compare); tensors sharing the same storage,
    offset, shape and strides are also one group.
    """
    groups: dict[object, list[str]] = {}
    for name, t in state.items():
        ptr = 0 if t.is_meta else t.untyped_storage().data_ptr()
        key: object = ("id", id(t)) if ptr == 0 else (  # no storage to compare (meta, empty): identity
            "storage", t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    return [tuple(g) for g in groups.values()]


def specs_with_ties(state: Mapping[str, torch.Tensor], names: Collection[str] | None = None) -> dict[str, WeightSpec]:
    """One :class:`WeightSpec` per tensor of ``state`` (``module.state_dict(keep_vars=True)``): tied names
    become one spec, under the first of them in ``names`` (default: the first in state order), the
    others its aliases. With ``names``, groups with no name in it are left out."""
    specs: dict[str, WeightSpec] = {}
    for group in tie_groups(state):
        chosen = [n for n in group if names is None or n in names]
        if not chosen:
            continue
        t = state[chosen[0]]
        specs[chosen[0]] = WeightSpec(chosen[0], tuple(t.shape), t.dtype,
                                      tuple(n for n in group if n != chosen[0]))
    return specs


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the model, without the batch dimension (Triton's convention)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}


@dataclass(frozen=True)
class BuildSpec:
    """Everything an engine build depends on except the weights.

    ``factory`` is an import path ``package.module:function`` returning a ``torch.nn.Module``.
    The batch dimension is dynamic in ``[1, max_batch]``.
    """

    factory: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    max_batch: int = 8
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    factory_kwargs: tuple[tuple[str, object], ...] = ()
    options: tuple[tuple[str, object], ...] = field(default=())

    def kwargs(self) -> dict[str, object]:
        return dict(self.factory_kwargs)

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)
