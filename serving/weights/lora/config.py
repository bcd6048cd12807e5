"""``adapter_config.json``: the fields that decide a LoRA merge, validated (every problem at once)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from serving.errors import ValidationError
from serving.publish.protocol import ADAPTER_CONFIG


def lora_invalid(source: str, problems: Sequence[str]) -> ValidationError:
    """The error of a malformed adapter (``reason="lora_invalid"``)."""
    return ValidationError(source, problems, reason="lora_invalid")


def _pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module name."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


_T = TypeVar("_T")


class _Fields:
    """Typed fields of a parsed ``adapter_config.json``; each problem is collected (a placeholder returned)."""

    def __init__(self, d: Mapping[str, object]) -> None:
        self.d = d
        self.problems: list[str] = []

    def integer(self, key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.problems.append(f"{key} must be a positive integer, found {value!r}")
            return 1
        return value

    def number(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problems.append(f"{key} must be a finite number, found {value!r}")
            return 1.0
        return float(value)

    def modules(self, key: str) -> tuple[str, ...] | str | None:
        """``target_modules`` / ``exclude_modules``: module names, a regex, or None (every module)."""
        value = self.d.get(key)
        if value is None or value == []:
            return None
        if isinstance(value, str):
            if value == "all-linear":
                return None  # every Linear: the weights name the modules
            try:
                re.compile(value)
            except re.error as e:
                self.problems.append(f"{key} {value!r} is not a valid regular expression: {e}")
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        self.problems.append(f"{key} must be a list of module names or a regex string, found {value!r}")
        return None

    def patterns(self, key: str, parse: Callable[[str, object], _T]) -> tuple[tuple[str, _T], ...]:
        """``rank_pattern`` / ``alpha_pattern``: (module regex, value) pairs, each value by ``parse``."""
        value = self.d.get(key) or {}
        if not isinstance(value, dict):
            self.problems.append(f"{key} must be an object {{module pattern: value}}, found {value!r}")
            return ()
        out = []
        for k, v in value.items():
            try:
                re.compile(k)
            except re.error as e:
                self.problems.append(f"{key} key {k!r} is not a valid regular expression: {e}")
                continue
            out.append((k, parse(f"{key}[{k!r}]", v)))
        return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that decide the merge."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, object], source: str) -> LoraConfig:
        """Validate a parsed ``adapter_config.json``; one error lists every problem."""
        f = _Fields(d)
        peft_type = d.get("peft_type")
        if peft_type not in (None, "LORA", "lora"):
            f.problems.append(f"peft_type {peft_type!r}: only LORA adapters can be merged")
        for flag in ("use_dora", "lora_bias", "use_qalora"):
            if d.get(flag):
                f.problems.append(f"{flag}=true is not supported: only plain LoRA (A, B, alpha) is merged")
        if d.get("layer_replication"):
            f.problems.append("layer_replication is not supported (it changes the model's structure)")
        config = cls(
            r=f.integer("r", d.get("r", 8)),
            lora_alpha=f.number("lora_alpha", d.get("lora_alpha", 8)),
            target_modules=f.modules("target_modules"),
            exclude_modules=f.modules("exclude_modules"),
            use_rslora=bool(d.get("use_rslora") or False),
            fan_in_fan_out=bool(d.get("fan_in_fan_out") or False),
            rank_pattern=f.patterns("rank_pattern", f.integer),
            alpha_pattern=f.patterns("alpha_pattern", f.number),
        )
        if f.problems:
            raise lora_invalid(f"{source}/{ADAPTER_CONFIG}", f.problems)
        return config

    def rank_for(self, module: str) -> int:
        key = _pattern_key([k for k, _ in self.rank_pattern], module)
        return dict(self.rank_pattern)[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key([k for k, _ in self.alpha_pattern], module)
        return dict(self.alpha_pattern)[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for this module."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists``: regex full match, or exact/suffix name match."""

        def match(spec: tuple[str, ...] | str) -> bool:
            if isinstance(spec, str):
                return re.fullmatch(spec, module) is not None
            return module in spec or any(module.endswith("." + t) for t in spec)

        if self.exclude_modules is not None and match(self.exclude_modules):
            return False
        return self.target_modules is None or match(self.target_modules)
