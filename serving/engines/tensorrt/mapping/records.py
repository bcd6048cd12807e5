"""Weight records and the weight map: one record per refittable engine weight, stored as JSON.

A :class:`WeightRecord` names an engine weight, the shape and dtype TensorRT expects and the
expression that computes it; a :class:`WeightMap` holds every record plus the checkpoint tensors
they read. Both (de)serialize to JSON, which is stored with the cached engine; reading checks the
schema and that every record reads only what the map declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from serving.engines.tensorrt.mapping.expr import (
    BnScale,
    BnShift,
    Cast,
    ConvBnBias,
    ConvBnWeight,
    Expr,
    Literal,
    MappingError,
    Permute,
    Reshape,
    Source,
    evaluate,
    expr_literals,
    expr_sources,
)
from serving.specs import WeightSpec, dtype_from_name, dtype_name

#: bump when the JSON layout of a weight map changes (part of the cache key)
MAPPING_SCHEMA = 1


# --------------------------------------------------------------------------- JSON
def expr_to_json(expr: Expr | None) -> dict[str, Any] | None:
    """JSON-serializable form of an expression (``None`` stays ``None``)."""
    if expr is None:
        return None
    if isinstance(expr, Source):
        return {"op": "source", "name": expr.name}
    if isinstance(expr, Literal):
        return {"op": "literal", "key": expr.key}
    if isinstance(expr, Permute):
        return {"op": "permute", "dims": list(expr.dims), "x": expr_to_json(expr.x)}
    if isinstance(expr, Reshape):
        return {"op": "reshape", "shape": list(expr.shape), "x": expr_to_json(expr.x)}
    if isinstance(expr, Cast):
        return {"op": "cast", "dtype": dtype_name(expr.dtype), "x": expr_to_json(expr.x)}
    if isinstance(expr, BnScale):
        return {"op": "bn_scale", "weight": expr_to_json(expr.weight),
                "running_var": expr_to_json(expr.running_var), "eps": expr.eps}
    if isinstance(expr, BnShift):
        return {"op": "bn_shift", "bias": expr_to_json(expr.bias),
                "running_mean": expr_to_json(expr.running_mean), "weight": expr_to_json(expr.weight),
                "running_var": expr_to_json(expr.running_var), "eps": expr.eps}
    if isinstance(expr, ConvBnWeight):
        return {"op": "conv_bn_weight", "conv_weight": expr_to_json(expr.conv_weight),
                "bn_weight": expr_to_json(expr.bn_weight), "running_var": expr_to_json(expr.running_var),
                "eps": expr.eps}
    return {"op": "conv_bn_bias", "conv_bias": expr_to_json(expr.conv_bias),
            "bn_bias": expr_to_json(expr.bn_bias), "running_mean": expr_to_json(expr.running_mean),
            "bn_weight": expr_to_json(expr.bn_weight), "running_var": expr_to_json(expr.running_var),
            "eps": expr.eps}


def _opt(d: Mapping[str, Any], key: str) -> Expr | None:
    v = d.get(key)
    return None if v is None else expr_from_json(v)


def _req(d: Mapping[str, Any], key: str) -> Expr:
    if d.get(key) is None:
        raise MappingError(f"expression {dict(d)!r} lacks {key!r}")
    return expr_from_json(d[key])


def expr_from_json(d: Any) -> Expr:
    """Inverse of :func:`expr_to_json`; a :class:`MappingError` for anything malformed."""
    if not isinstance(d, Mapping) or not isinstance(d.get("op"), str):
        raise MappingError(f"not an expression: {d!r}")
    op = d["op"]
    try:
        if op == "source":
            return Source(str(d["name"]))
        if op == "literal":
            return Literal(str(d["key"]))
        if op == "permute":
            return Permute(_req(d, "x"), tuple(int(i) for i in d["dims"]))
        if op == "reshape":
            return Reshape(_req(d, "x"), tuple(int(i) for i in d["shape"]))
        if op == "cast":
            return Cast(_req(d, "x"), dtype_from_name(str(d["dtype"])))
        if op == "bn_scale":
            return BnScale(_opt(d, "weight"), _req(d, "running_var"), float(d["eps"]))
        if op == "bn_shift":
            return BnShift(_opt(d, "bias"), _req(d, "running_mean"), _opt(d, "weight"),
                           _req(d, "running_var"), float(d["eps"]))
        if op == "conv_bn_weight":
            return ConvBnWeight(_req(d, "conv_weight"), _opt(d, "bn_weight"), _req(d, "running_var"),
                                float(d["eps"]))
        if op == "conv_bn_bias":
            return ConvBnBias(_opt(d, "conv_bias"), _opt(d, "bn_bias"), _req(d, "running_mean"),
                              _opt(d, "bn_weight"), _req(d, "running_var"), float(d["eps"]))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, MappingError):
            raise
        raise MappingError(f"malformed {op!r} expression {dict(d)!r}: {e}") from e
    raise MappingError(f"unknown expression op {op!r}")


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class WeightRecord:
    """One refittable engine weight: its TensorRT name, the tensor TensorRT expects, and its recipe."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    expr: Expr

    @property
    def sources(self) -> frozenset[str]:
        return expr_sources(self.expr)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "expr": expr_to_json(self.expr)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightRecord:
        try:
            return cls(str(d["name"]), tuple(int(i) for i in d["shape"]), dtype_from_name(str(d["dtype"])),
                       expr_from_json(d["expr"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, MappingError):
                raise
            raise MappingError(f"malformed weight record {dict(d)!r}: {e}") from e


def materialize(record: WeightRecord, sources: Mapping[str, torch.Tensor],
                literals: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The dense tensor to hand to TensorRT for ``record``: evaluated, shape/dtype checked, contiguous.

    Torch-TensorRT makes weights contiguous before wrapping them in ``trt.Weights``
    (``to_trt_weights`` in ``dynamo/conversion/converter_utils.py``), so the element order TensorRT
    expects is the row-major order of the recorded shape.
    """
    try:
        t = evaluate(record.expr, sources, literals)
    except MappingError as e:
        raise MappingError(f"engine weight {record.name!r}: {e}") from e
    except RuntimeError as e:  # shape errors from permute/reshape on a wrongly shaped source
        raise MappingError(f"engine weight {record.name!r}: cannot compute it from the given tensors: "
                           f"{e}") from e
    if t.dtype != record.dtype:
        raise MappingError(f"engine weight {record.name!r}: computed dtype {dtype_name(t.dtype)}, "
                           f"the engine expects {dtype_name(record.dtype)}")
    if tuple(t.shape) != record.shape:
        raise MappingError(f"engine weight {record.name!r}: computed shape {tuple(t.shape)}, "
                           f"the engine expects {record.shape}")
    return t.contiguous()


@dataclass(frozen=True)
class WeightMap:
    """Every refittable engine weight's record, plus what the checkpoint must provide."""

    records: tuple[WeightRecord, ...]
    sources: Mapping[str, WeightSpec]  # checkpoint tensors the records read
    ignored: tuple[str, ...] = ()  # state-dict entries the model never reads (e.g. num_batches_tracked)
    literal_keys: tuple[str, ...] = ()
    schema: int = MAPPING_SCHEMA

    def by_name(self) -> dict[str, WeightRecord]:
        return {r.name: r for r in self.records}

    def dependents(self, changed: Iterable[str]) -> list[WeightRecord]:
        """Records that read any of the ``changed`` checkpoint tensors."""
        ch = set(changed)
        return [r for r in self.records if r.sources & ch]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "records": [r.to_json() for r in self.records],
            "sources": [s.to_json() for s in self.sources.values()],
            "ignored": list(self.ignored),
            "literals": list(self.literal_keys),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightMap:
        if not isinstance(d, Mapping):
            raise MappingError(f"weight map must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema")
        if schema != MAPPING_SCHEMA:
            raise MappingError(f"weight map schema {schema!r}; this hotswap reads schema {MAPPING_SCHEMA}")
        try:
            records = tuple(WeightRecord.from_json(r) for r in d["records"])
            specs = [WeightSpec.from_json(s) for s in d["sources"]]
            wm = cls(records, {s.name: s for s in specs}, tuple(str(x) for x in d.get("ignored", [])),
                     tuple(str(x) for x in d.get("literals", [])))
        except (KeyError, TypeError, AssertionError) as e:
            raise MappingError(f"malformed weight map: {e}") from e
        problems = check_map_consistency(wm)
        if problems:
            raise MappingError("inconsistent weight map: " + "; ".join(problems))
        return wm


def check_map_consistency(wm: WeightMap) -> list[str]:
    """Every record reads only declared sources and declared literals; names are unique."""
    problems = []
    seen: set[str] = set()
    for r in wm.records:
        if r.name in seen:
            problems.append(f"engine weight {r.name!r} appears twice")
        seen.add(r.name)
        undeclared = sorted(r.sources - set(wm.sources))
        if undeclared:
            problems.append(f"engine weight {r.name!r} reads undeclared checkpoint tensors {undeclared}")
        lits = sorted(expr_literals(r.expr) - set(wm.literal_keys))
        if lits:
            problems.append(f"engine weight {r.name!r} reads undeclared constants {lits}")
    return problems


__all__ = [
    "MAPPING_SCHEMA", "WeightMap", "WeightRecord", "check_map_consistency", "expr_from_json", "expr_to_json",
    "materialize",
]
