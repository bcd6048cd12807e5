"""An adapter's tensors checked against the base weights: which modules it adapts, and how."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from serving.errors import ValidationError
from serving.specs import WeightSpec, dtype_name
from serving.weights.lora.config import LoraConfig, lora_invalid

PEFT_PREFIX = "base_model.model."

_LINEAR_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_UNSUPPORTED_PARTS = ("lora_magnitude_vector", "lora_E", "lora_T")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``W = W0 + scale * delta(A, B)``."""

    module: str
    #: the base weight it changes (``<module>.weight``)
    weight: str
    kind: str  # "linear" | "embedding" | "conv"
    a: torch.Tensor
    b: torch.Tensor
    rank: int
    #: alpha / r (or alpha / sqrt(r)), without the server's extra lora_scale
    scale: float
    #: the base weight is stored [in, out] (fan_in_fan_out / Conv1D)
    transposed: bool = False


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter, ready to merge into base tensors of the engine's specs."""

    name: str
    config: LoraConfig
    modules: tuple[LoraModule, ...]
    #: full tensors the adapter replaces (trained biases, modules_to_save)
    replaced: Mapping[str, torch.Tensor]
    source: str = ""

    @property
    def touched(self) -> frozenset[str]:
        """Base weight names the merge changes."""
        return frozenset([m.weight for m in self.modules] + list(self.replaced))


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


@dataclass
class _Sorted:
    """An adapter's tensors sorted by role, with the problems met on the way."""

    #: module -> {"A": lora_A tensor, "B": lora_B tensor}
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: module -> "low_rank" (lora_A/B) | "embedding" (lora_embedding_A/B)
    kinds: dict[str, str] = field(default_factory=dict)
    #: full base weights the adapter replaces
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_names: set[str] = field(default_factory=set)
    #: the adapter is malformed / does not fit the base
    invalid: list[str] = field(default_factory=list)
    mismatch: list[str] = field(default_factory=list)


def _sort_tensors(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, WeightSpec]) -> _Sorted:
    """Each tensor as a LoRA part of a module, a base weight replaced whole, or a problem."""
    found = _Sorted()
    for key, t in tensors.items():
        k = _strip(key)
        m = _LINEAR_KEY.match(k) or _EMBED_KEY.match(k)
        if m is not None:
            _add_part(found, key, m, t)
        elif any(f".{p}" in f".{k}" for p in _UNSUPPORTED_PARTS):
            found.invalid.append(f"{key!r}: DoRA/AdaLoRA tensors are not supported; merge only plain LoRA adapters")
        elif k in specs:
            _add_replaced(found, key, k, t, specs[k])
        else:
            found.mismatch.append(f"{key!r}: neither a LoRA tensor nor a weight of the base model (no {k!r} in it)")
    if len(found.adapter_names) > 1:
        found.invalid.append(f"tensors of several adapters ({sorted(found.adapter_names)}); save one adapter per "
                             f"directory")
    return found


def _add_part(found: _Sorted, key: str, m: re.Match[str], t: torch.Tensor) -> None:
    module, part = m.group("module"), m.group("part")
    if m.groupdict().get("param") == "bias":
        found.invalid.append(f"module {module!r}: {key!r} is a LoRA bias (lora_bias=true), which is not supported")
        return
    if m.group("adapter"):
        found.adapter_names.add(m.group("adapter"))
    kind = "embedding" if part.startswith("lora_embedding") else "low_rank"
    if found.kinds.setdefault(module, kind) != kind:
        found.invalid.append(f"module {module!r}: mixes lora_A/B and lora_embedding_A/B tensors")
        return
    side = part[-1]  # "A" | "B"
    if side in found.parts.setdefault(module, {}):
        found.invalid.append(f"module {module!r}: several lora_{side} tensors (several adapter names?)")
        return
    found.parts[module][side] = t


def _add_replaced(found: _Sorted, key: str, name: str, t: torch.Tensor, spec: WeightSpec) -> None:
    """A tensor naming base weight ``name`` (a trained bias, ``modules_to_save``): it replaces the weight whole."""
    if _shape(t) != spec.shape:
        found.mismatch.append(f"{key!r}: replaces base weight {name!r} of shape {spec.shape}, "
                              f"but has shape {_shape(t)}")
    elif t.is_floating_point() != spec.dtype.is_floating_point or (
            not t.is_floating_point() and t.dtype != spec.dtype):
        found.mismatch.append(f"{key!r}: dtype {dtype_name(t.dtype)}, base weight {name!r} is "
                              f"{dtype_name(spec.dtype)}")
    elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
        found.invalid.append(f"{key!r}: holds NaN/Inf values")
    else:
        found.replaced[name] = t


def _check_module(module: str, got: Mapping[str, torch.Tensor], kind: str, config: LoraConfig,
                  specs: Mapping[str, WeightSpec]) -> LoraModule | tuple[Literal["invalid", "mismatch"], str]:
    """One adapted module checked against its base weight: the :class:`LoraModule`, or what is wrong."""
    if set(got) != {"A", "B"}:
        lacking = "lora_B" if "A" in got else "lora_A"
        return "invalid", f"module {module!r}: {lacking} is missing (A and B come in pairs)"
    a, b = got["A"], got["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        return "invalid", f"module {module!r}: A/B must be floating point, found {dtype_name(a.dtype)}/" \
                          f"{dtype_name(b.dtype)}"
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return "invalid", f"module {module!r}: lora_A or lora_B holds NaN/Inf values"
    if not config.targets(module):
        return "mismatch", (f"module {module!r}: has LoRA weights but adapter_config.json's target_modules "
                            f"{config.target_modules!r} (exclude_modules {config.exclude_modules!r}) do not "
                            f"select it")
    weight = f"{module}.weight"
    wspec = specs.get(weight)
    if wspec is None:
        near = sorted(n for n in specs if n.endswith(f".{module.rsplit('.', 1)[-1]}.weight"))[:3]
        hint = f"; the base has {near}" if near else ""
        return "mismatch", (f"module {module!r}: the base model has no weight {weight!r} (adapter made for "
                            f"another model, or a different module naming?){hint}")
    problem, layout, transposed = _check_shapes(module, kind, a, b, wspec, config.fan_in_fan_out)
    if problem:
        return "mismatch", problem
    rank = int(a.shape[0])
    want = config.rank_for(module)
    if want != rank:
        return "invalid", (f"module {module!r}: tensors have rank {rank}, adapter_config.json says r={want} "
                           f"(r / rank_pattern); the scale alpha/r would be wrong")
    if not wspec.dtype.is_floating_point:
        return "mismatch", f"module {module!r}: base weight {weight!r} is {dtype_name(wspec.dtype)}, not floating"
    return LoraModule(module, weight, layout, a, b, rank, config.scale_for(module), transposed)


def build_adapter(config: LoraConfig, tensors: Mapping[str, torch.Tensor], specs: Mapping[str, WeightSpec],
                  *, source: str, name: str) -> LoraAdapter:
    """Check an adapter's tensors against the base weight specs; every problem names the module.

    Raises :class:`ValidationError` with ``reason="lora_mismatch"`` when targets or shapes do not fit
    the base, ``reason="lora_invalid"`` when the adapter itself is malformed (unpaired A/B, several
    adapter names, NaN/Inf, ranks that disagree with the config).
    """
    found = _sort_tensors(tensors, specs)
    modules: list[LoraModule] = []
    for module in sorted(found.parts):
        checked = _check_module(module, found.parts[module], found.kinds[module], config, specs)
        if isinstance(checked, LoraModule):
            modules.append(checked)
        else:
            (found.invalid if checked[0] == "invalid" else found.mismatch).append(checked[1])
    both = sorted(set(found.replaced) & {m.weight for m in modules})
    if both:
        found.invalid.append(f"weights {both} are both replaced whole and LoRA-adapted")
    if not modules and not found.replaced and not found.invalid and not found.mismatch:
        found.invalid.append("no LoRA tensors (lora_A/lora_B) in adapter_model")
    if found.invalid:
        raise lora_invalid(source, found.invalid + found.mismatch)
    if found.mismatch:
        raise ValidationError(source, found.mismatch, reason="lora_mismatch")
    return LoraAdapter(name, config, tuple(modules), found.replaced, source)


def _check_shapes(module: str, kind: str, a: torch.Tensor, b: torch.Tensor, spec: WeightSpec,
                  fan_in_fan_out: bool) -> tuple[str | None, str, bool]:
    """``(problem or None, kind, transposed)``; the problem names the module, expected and found shapes."""
    w = spec.shape
    sa, sb = _shape(a), _shape(b)
    where = f"module {module!r}: lora_A {sa}, lora_B {sb} vs base weight {spec.name!r} {w}"
    if kind == "embedding":
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            return f"{where}: lora_embedding_A must be [r, num_embeddings], lora_embedding_B [dim, r]", kind, False
        if w != (sa[1], sb[0]):
            return f"{where}: expected an embedding of shape {(sa[1], sb[0])}", kind, False
        return None, kind, False
    if len(sa) == 4:
        if len(sb) != 4 or sb[2:] != (1, 1) or sa[0] != sb[1]:
            return f"{where}: a Conv2d adapter needs lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1]", "conv", False
        if w != (sb[0], sa[1], sa[2], sa[3]):
            return f"{where}: expected a conv weight of shape {(sb[0], sa[1], sa[2], sa[3])}", "conv", False
        return None, "conv", False
    if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
        return f"{where}: lora_A must be [r, in_features] and lora_B [out_features, r] with the same r", kind, False
    standard, flipped = (sb[0], sa[1]), (sa[1], sb[0])
    if w == standard and w == flipped:
        return None, "linear", fan_in_fan_out
    if w == standard:
        return None, "linear", False
    if w == flipped:
        return None, "linear", True
    return f"{where}: expected {standard} (or {flipped} with fan_in_fan_out)", "linear", False
