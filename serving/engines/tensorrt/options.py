"""Options of a TensorRT build and of its refits: one frozen dataclass, each option described once.

Every field of :class:`TrtBuildOptions` carries, in its metadata, the option key it is read from
(an entry of ``BuildSpec.options``); the key's row of the settings table
(:data:`serving.settings.TENSORRT_OPTIONS`) says its kind, what it does and its lower bound.
:data:`OPTIONS` lists them (key, field, kind, default, doc), and :meth:`TrtBuildOptions.from_spec`
parses a spec's options by them.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal, cast

from serving.errors import ConfigError
from serving.settings import TENSORRT_OPTIONS
from serving.specs import BuildSpec

OptionKind = Literal["bool", "int"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _option(key: str) -> dict[str, str]:
    """Field metadata: the option key a field is read from (its row of the settings table describes it)."""
    return {"option": key}


@dataclass(frozen=True)
class TrtBuildOptions:
    """Settings of a TensorRT build and of its refits (from ``BuildSpec.options``; see :data:`OPTIONS`)."""

    weights_validation: bool = field(default=True, metadata=_option("trt_weights_validation"))
    max_threads: int = field(default=0, metadata=_option("trt_refit_max_threads"))
    optimization_level: int | None = field(default=None, metadata=_option("trt_optimization_level"))
    workspace_size: int = field(default=0, metadata=_option("trt_workspace_size"))
    verify_seed: int = field(default=0, metadata=_option("trt_verify_seed"))

    @classmethod
    def from_spec(cls, spec: BuildSpec) -> TrtBuildOptions:
        """The options a spec sets (defaults for the rest); one :class:`ConfigError` naming every bad value."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for opt in OPTIONS:
            raw = spec.option(opt.key)
            if raw is None:
                continue
            try:
                values[opt.name] = opt.parse(raw)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values)


@dataclass(frozen=True)
class OptionInfo:
    """One option: its key in ``BuildSpec.options``, the :class:`TrtBuildOptions` field it sets, and its rules."""

    key: str
    name: str
    kind: OptionKind
    default: bool | int | None
    doc: str
    minimum: int | None = None

    def parse(self, raw: object) -> bool | int:
        """The value of a raw option (a string from ``config.pbtxt``): a bool from true/false, 1/0 or
        yes/no (any case), an int from its decimal form; ``ValueError`` naming key and value."""
        if self.kind == "bool":
            text = str(raw).strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError(f"option {self.key}={text!r}: use true or false")
            return text in _TRUE
        try:
            number = int(str(raw))
        except ValueError:
            raise ValueError(f"option {self.key}={raw!r} is not an integer") from None
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"option {self.key}={number} must be >= {self.minimum}")
        return number


def _info(f: Field[Any]) -> OptionInfo:
    row = next(s for s in TENSORRT_OPTIONS if s.name == f.metadata["option"])
    kind = cast(OptionKind, row.kind)
    minimum = None if row.minimum is None else int(row.minimum)
    return OptionInfo(row.name, f.name, kind, cast("bool | int | None", f.default), row.doc, minimum)


#: every option of :class:`TrtBuildOptions`, in field order
OPTIONS: tuple[OptionInfo, ...] = tuple(_info(f) for f in fields(TrtBuildOptions))

__all__ = ["OPTIONS", "OptionInfo", "OptionKind", "TrtBuildOptions"]
