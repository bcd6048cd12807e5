"""How every refittable TensorRT weight is computed from checkpoint tensors: pure torch, JSON records.

A TensorRT engine built by Torch-TensorRT does not hold the checkpoint's tensors as they are:
a ``nn.Linear`` weight goes in transposed (``aten.permute`` is constant-folded before conversion),
a BatchNorm after a convolution becomes a per-channel ``SCALE``/``SHIFT`` pair computed with the
layer's own ``eps``, and tensors may be cast. This module describes each engine weight as a small
expression over checkpoint tensors (:data:`Expr`), evaluates it, and (de)serializes it as JSON so
the map is stored with the cached engine.

Where the records come from (see :func:`derive_records`): Torch-TensorRT's converter bookkeeping,
``ConversionContext.weight_refit_map`` (engine weight name -> the exact tensor the converter handed
to TensorRT, filled by ``to_trt_weights`` in ``dynamo/conversion/converter_utils.py``), tied back to
checkpoint names by object identity with the tensors the interpreter fetched for ``get_attr`` nodes
and by the converter naming scheme ``[LAYER]-[<ir>_ops.<target>]-[<node>] ROLE`` (same file).
Nothing is found by guessing names or by matching values; the engine module checks every record
against Torch-TensorRT's own result for an independent random weight set before it is trusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from serving.specs import WeightSpec, dtype_from_name, dtype_name

#: bump when the JSON layout of a weight map changes (part of the cache key)
MAPPING_SCHEMA = 1

#: ``node.meta`` key under which :func:`annotate_constant_exprs` leaves a node's expression
META_KEY = "hotswap_expr"


# --------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Source:
    """A checkpoint tensor, by state-dict name."""

    name: str


@dataclass(frozen=True)
class Literal:
    """A tensor that does not come from the checkpoint (stored with the engine, by key)."""

    key: str


@dataclass(frozen=True)
class Permute:
    """``x.permute(dims)`` (a transpose is a permutation of two dims)."""

    x: Expr
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Reshape:
    """``x.reshape(shape)``."""

    x: Expr
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Cast:
    """``x.to(dtype)``."""

    x: Expr
    dtype: torch.dtype


@dataclass(frozen=True)
class BnScale:
    """BatchNorm folded to a per-channel scale: ``weight / sqrt(running_var + eps)``."""

    weight: Expr | None  # None: affine=False, weight is ones
    running_var: Expr
    eps: float


@dataclass(frozen=True)
class BnShift:
    """BatchNorm folded to a per-channel shift: ``bias - running_mean * scale``."""

    bias: Expr | None  # None: affine=False, bias is zeros
    running_mean: Expr
    weight: Expr | None
    running_var: Expr
    eps: float


@dataclass(frozen=True)
class ConvBnWeight:
    """A convolution kernel with the following BatchNorm folded in: ``W * scale[:, None, ...]``."""

    conv_weight: Expr
    bn_weight: Expr | None
    running_var: Expr
    eps: float


@dataclass(frozen=True)
class ConvBnBias:
    """The bias of a conv+BatchNorm fold: ``(conv_bias - running_mean) * scale + bn_bias``."""

    conv_bias: Expr | None
    bn_bias: Expr | None
    running_mean: Expr
    bn_weight: Expr | None
    running_var: Expr
    eps: float


Expr: TypeAlias = Source | Literal | Permute | Reshape | Cast | BnScale | BnShift | ConvBnWeight | ConvBnBias


def transpose(x: Expr, dim0: int, dim1: int, rank: int) -> Permute:
    """``x.transpose(dim0, dim1)`` of a ``rank``-dimensional tensor, as a permutation."""
    dims = list(range(rank))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute(x, tuple(dims))


# --------------------------------------------------------------------------- pure tensor maths
def bn_scale(weight: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel scale of a BatchNorm in eval mode.

    Same formula as Torch-TensorRT's ``batch_norm_constant_folding``
    (``dynamo/conversion/impl/normalization/ops.py``): ``weight / torch.sqrt(running_var + eps)``.
    """
    w = torch.ones_like(running_var) if weight is None else weight
    return w / torch.sqrt(running_var + eps)


def bn_shift(bias: torch.Tensor | None, running_mean: torch.Tensor, weight: torch.Tensor | None,
             running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel shift of a BatchNorm in eval mode: ``bias - running_mean * scale``."""
    b = torch.zeros_like(running_mean) if bias is None else bias
    return b - running_mean * bn_scale(weight, running_var, eps)


def fold_conv_bn_weight(conv_weight: torch.Tensor, bn_weight: torch.Tensor | None,
                        running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Conv kernel ``[C_out, ...]`` times the BatchNorm scale of its output channel."""
    scale = bn_scale(bn_weight, running_var, eps)
    return conv_weight * scale.reshape(-1, *([1] * (conv_weight.dim() - 1)))


def fold_conv_bn_bias(conv_bias: torch.Tensor | None, bn_bias: torch.Tensor | None,
                      running_mean: torch.Tensor, bn_weight: torch.Tensor | None,
                      running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Bias of a conv followed by BatchNorm: ``(conv_bias - mean) * scale + bn_bias``."""
    cb = torch.zeros_like(running_mean) if conv_bias is None else conv_bias
    bb = torch.zeros_like(running_mean) if bn_bias is None else bn_bias
    return (cb - running_mean) * bn_scale(bn_weight, running_var, eps) + bb


# --------------------------------------------------------------------------- evaluation
class MappingError(ValueError):
    """A record cannot be evaluated or (de)serialized; the message names the weight and the cause."""


def evaluate(expr: Expr, sources: Mapping[str, torch.Tensor],
             literals: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor ``expr`` describes, from checkpoint tensors and stored literals."""
    lits = literals or {}

    def ev(e: Expr | None) -> torch.Tensor | None:
        return None if e is None else evaluate(e, sources, lits)

    def req(e: Expr) -> torch.Tensor:
        return evaluate(e, sources, lits)

    if isinstance(expr, Source):
        if expr.name not in sources:
            raise MappingError(f"checkpoint tensor {expr.name!r} is needed but was not provided")
        return sources[expr.name]
    if isinstance(expr, Literal):
        if expr.key not in lits:
            raise MappingError(f"stored constant {expr.key!r} is missing from the engine's cache entry")
        return lits[expr.key]
    if isinstance(expr, Permute):
        return req(expr.x).permute(expr.dims)
    if isinstance(expr, Reshape):
        return req(expr.x).reshape(expr.shape)
    if isinstance(expr, Cast):
        return req(expr.x).to(expr.dtype)
    if isinstance(expr, BnScale):
        return bn_scale(ev(expr.weight), req(expr.running_var), expr.eps)
    if isinstance(expr, BnShift):
        return bn_shift(ev(expr.bias), req(expr.running_mean), ev(expr.weight), req(expr.running_var),
                        expr.eps)
    if isinstance(expr, ConvBnWeight):
        return fold_conv_bn_weight(req(expr.conv_weight), ev(expr.bn_weight), req(expr.running_var),
                                   expr.eps)
    if isinstance(expr, ConvBnBias):
        return fold_conv_bn_bias(ev(expr.conv_bias), ev(expr.bn_bias), req(expr.running_mean),
                                 ev(expr.bn_weight), req(expr.running_var), expr.eps)
    raise MappingError(f"unknown expression {expr!r}")


def expr_sources(expr: Expr | None) -> frozenset[str]:
    """Names of the checkpoint tensors ``expr`` reads."""
    if expr is None or isinstance(expr, Literal):
        return frozenset()
    if isinstance(expr, Source):
        return frozenset({expr.name})
    if isinstance(expr, (Permute, Reshape, Cast)):
        return expr_sources(expr.x)
    if isinstance(expr, BnScale):
        return expr_sources(expr.weight) | expr_sources(expr.running_var)
    if isinstance(expr, BnShift):
        return (expr_sources(expr.bias) | expr_sources(expr.running_mean) | expr_sources(expr.weight)
                | expr_sources(expr.running_var))
    if isinstance(expr, ConvBnWeight):
        return expr_sources(expr.conv_weight) | expr_sources(expr.bn_weight) | expr_sources(expr.running_var)
    return (expr_sources(expr.conv_bias) | expr_sources(expr.bn_bias) | expr_sources(expr.running_mean)
            | expr_sources(expr.bn_weight) | expr_sources(expr.running_var))


def expr_literals(expr: Expr | None) -> frozenset[str]:
    """Keys of the stored constants ``expr`` reads."""
    if expr is None or isinstance(expr, Source):
        return frozenset()
    if isinstance(expr, Literal):
        return frozenset({expr.key})
    if isinstance(expr, (Permute, Reshape, Cast)):
        return expr_literals(expr.x)
    parts: list[Expr | None]
    if isinstance(expr, BnScale):
        parts = [expr.weight, expr.running_var]
    elif isinstance(expr, BnShift):
        parts = [expr.bias, expr.running_mean, expr.weight, expr.running_var]
    elif isinstance(expr, ConvBnWeight):
        parts = [expr.conv_weight, expr.bn_weight, expr.running_var]
    else:
        parts = [expr.conv_bias, expr.bn_bias, expr.running_mean, expr.bn_weight, expr.running_var]
    out: frozenset[str] = frozenset()
    for p in parts:
        out |= expr_literals(p)
    return out


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


# --------------------------------------------------------------------------- Torch-TensorRT names
@dataclass(frozen=True)
class ParsedWeightName:
    """An engine weight name as Torch-TensorRT's ``to_trt_weights`` builds it."""

    layer: str  # CONVOLUTION, DECONVOLUTION, SCALE, CONSTANT
    target: str  # e.g. "ATEN_ops._native_batch_norm_legit_no_training.default" ("" for constants)
    node: str  # the name the converter was given (the FX node name for conv/bn)
    role: str  # KERNEL, BIAS, SCALE, SHIFT, CONSTANT, POWER


_NAMED = re.compile(r"^\[(?P<layer>[A-Z]+)\]-\[(?P<target>.*)\]-\[(?P<node>.*)\] (?P<role>[A-Z]+)$")


def parse_weight_name(name: str) -> ParsedWeightName | None:
    """Split an engine weight name; ``None`` when it does not follow Torch-TensorRT's scheme.

    The scheme (``to_trt_weights`` in ``dynamo/conversion/converter_utils.py``, Torch-TensorRT
    2.10-2.14): constants are ``f"{name} CONSTANT"``; other weights are
    ``f"[{layer_type_name}]-[{source_ir}_ops.{target}]-[{name}] {weight_type_name}"``.
    """
    m = _NAMED.match(name)
    if m:
        return ParsedWeightName(m["layer"], m["target"], m["node"], m["role"])
    if name.endswith(" CONSTANT"):
        return ParsedWeightName("CONSTANT", "", name[: -len(" CONSTANT")], "CONSTANT")
    return None


# --------------------------------------------------------------------------- FX annotation
def _aten(name: str) -> Any:
    """``torch.ops.aten.<op>.<overload>`` or None where this torch lacks it."""
    op, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, op, None)
    return getattr(packet, overload or "default", None) if packet is not None else None


_IDENTITY_OPS = ("clone.default", "alias.default", "detach.default", "lift_fresh_copy.default",
                 "contiguous.default")
_RESHAPE_OPS = ("view.default", "reshape.default", "_unsafe_view.default", "unsqueeze.default",
                "squeeze.dim", "squeeze.dims", "squeeze.default", "flatten.using_ints")


def _static_shape(node: Any) -> tuple[int, ...] | None:
    val = getattr(node, "meta", {}).get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def annotate_constant_exprs(gm: torch.fx.GraphModule, source_names: Iterable[str]) -> dict[str, Expr]:
    """Leave on every node computed only from checkpoint tensors by reshuffles and casts its expression.

    Run on the graph module *before* Torch-TensorRT's ``post_lowering``: its constant folding
    replaces such nodes with new ``_frozen_param<N>`` ``get_attr`` nodes and copies the replaced
    node's ``meta`` onto them (``new_input_node.meta.update(node.meta)`` in
    ``replace_node_with_constant``, ``dynamo/lowering/passes/constant_folding.py``), so the
    expression follows the folded constant into the converted graph. Returns node name -> expression.
    """
    names = set(source_names)
    out: dict[str, Expr] = {}
    exprs: dict[Any, Expr] = {}
    identity = {_aten(n) for n in _IDENTITY_OPS} - {None}
    reshape = {_aten(n) for n in _RESHAPE_OPS} - {None}
    permute, t_op, transpose_op, to_copy = (_aten("permute.default"), _aten("t.default"),
                                            _aten("transpose.int"), _aten("_to_copy.default"))
    for node in gm.graph.nodes:
        expr: Expr | None = None
        if node.op == "get_attr" and str(node.target) in names:
            expr = Source(str(node.target))
        elif node.op == "call_function" and node.args and node.args[0] in exprs:
            x = exprs[node.args[0]]
            tgt = node.target
            in_shape = _static_shape(node.args[0])
            if tgt in identity:
                expr = x
            elif tgt is permute:
                expr = Permute(x, tuple(int(d) for d in node.args[1]))
            elif tgt is t_op and in_shape is not None:
                expr = x if len(in_shape) < 2 else Permute(x, (1, 0))
            elif tgt is transpose_op and in_shape is not None:
                rank = len(in_shape)
                expr = transpose(x, int(node.args[1]) % rank, int(node.args[2]) % rank, rank)
            elif tgt in reshape:
                out_shape = _static_shape(node)
                if out_shape is not None:
                    expr = Reshape(x, out_shape)
            elif tgt is to_copy:
                dtype = node.kwargs.get("dtype")
                expr = Cast(x, dtype) if isinstance(dtype, torch.dtype) else x
        if expr is not None:
            exprs[node] = expr
            out[node.name] = expr
            node.meta[META_KEY] = expr_to_json(expr)
    return out


def node_expr(node: Any, source_names: Iterable[str]) -> Expr | None:
    """Expression of a ``get_attr`` node of the lowered graph: a checkpoint tensor or a folded one."""
    if getattr(node, "op", None) != "get_attr":
        return None
    if str(node.target) in set(source_names):
        return Source(str(node.target))
    meta = getattr(node, "meta", {}).get(META_KEY)
    return None if meta is None else expr_from_json(meta)


# --------------------------------------------------------------------------- derivation
#: batch-norm ATen targets and the positions of (weight, bias, running_mean, running_var, eps),
#: as Torch-TensorRT's converters read them (``aten_ops_batch_norm`` and
#: ``aten_ops_batch_norm_legit_no_training`` in ``dynamo/conversion/aten_ops_converters.py``)
BN_ARG_POSITIONS: dict[str, tuple[int, int, int, int, int]] = {
    "aten.batch_norm.default": (1, 2, 3, 4, 7),
    "aten.native_batch_norm.default": (1, 2, 3, 4, 7),
    "aten._native_batch_norm_legit_no_training.default": (1, 2, 3, 4, 6),
}


@dataclass(frozen=True)
class BatchNormNode:
    """What a batch-norm node of the lowered graph reads (expressions, ``None`` for absent/unknown)."""

    weight: Expr | None
    bias: Expr | None
    running_mean: Expr | None
    running_var: Expr | None
    eps: float
    has_weight: bool = True
    has_bias: bool = True


@dataclass(frozen=True)
class Derivation:
    """Records for the names asked for; literal values to store; what could not be derived."""

    records: tuple[WeightRecord, ...]
    literals: Mapping[str, torch.Tensor]
    problems: tuple[str, ...]


def batch_norm_nodes(gm: torch.fx.GraphModule, source_names: Iterable[str]) -> dict[str, BatchNormNode]:
    """Batch-norm nodes of a lowered graph by node name, with the expressions of their parameters."""
    names = list(source_names)
    out: dict[str, BatchNormNode] = {}
    for node in gm.graph.nodes:
        pos = BN_ARG_POSITIONS.get(str(node.target).replace("aten::", "aten."))
        if node.op != "call_function" or pos is None:
            continue
        wi, bi, mi, vi, ei = pos

        def arg(i: int, _node: Any = node) -> Any:
            return _node.args[i] if i < len(_node.args) else None

        def ex(a: Any) -> Expr | None:
            return node_expr(a, names)

        eps = arg(ei)
        out[node.name] = BatchNormNode(ex(arg(wi)), ex(arg(bi)), ex(arg(mi)), ex(arg(vi)),
                                       float(eps) if isinstance(eps, (int, float)) else math.nan,
                                       arg(wi) is not None, arg(bi) is not None)
    return out


def derive_records(
    refit_map: Mapping[str, torch.Tensor],
    names: Sequence[str],
    attr_tensors: Sequence[tuple[torch.Tensor, Expr | None]],
    bn_nodes: Mapping[str, BatchNormNode],
    source_specs: Mapping[str, WeightSpec],
) -> Derivation:
    """One record per engine weight in ``names`` (``Refitter.get_all_weights()``).

    ``refit_map`` is Torch-TensorRT's ``ConversionContext.weight_refit_map`` for the converted
    graph; ``attr_tensors`` are the tensors its interpreter returned for ``get_attr`` nodes (with
    the node's expression, ``None`` for a constant that is not in the checkpoint). A weight is:

    * the very tensor a ``get_attr`` returned (``is``): that node's expression, or a literal;
    * a batch-norm ``SCALE``/``SHIFT`` (by the converter's name): the fold with the node's eps;
    * anything else: a literal, which the engine only accepts after the random-weights check.
    """
    by_id: dict[int, tuple[torch.Tensor, Expr | None]] = {id(t): (t, e) for t, e in attr_tensors}
    records: list[WeightRecord] = []
    literals: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name in names:
        if name not in refit_map:
            problems.append(f"engine weight {name!r} is not in Torch-TensorRT's weight bookkeeping "
                            "(ConversionContext.weight_refit_map); cannot say how to compute it")
            continue
        value = refit_map[name]
        expr: Expr | None = None
        hit = by_id.get(id(value))
        parsed = parse_weight_name(name)
        if hit is not None and hit[0] is value:
            expr = hit[1]
        elif parsed is not None and parsed.layer == "SCALE" and parsed.role in ("SCALE", "SHIFT"):
            bn = bn_nodes.get(parsed.node)
            if bn is None:
                problems.append(f"engine weight {name!r}: no batch-norm node {parsed.node!r} "
                                "in the lowered graph")
                continue
            missing = [k for k, v in (("running_var", bn.running_var), ("running_mean", bn.running_mean))
                       if v is None]
            if bn.has_weight and bn.weight is None:
                missing.append("weight")
            if bn.has_bias and bn.bias is None and parsed.role == "SHIFT":
                missing.append("bias")
            if missing or math.isnan(bn.eps) or bn.running_var is None or bn.running_mean is None:
                problems.append(f"engine weight {name!r}: batch norm {parsed.node!r} reads "
                                f"{missing or 'eps'} from something that is not a checkpoint tensor")
                continue
            if parsed.role == "SCALE":
                expr = BnScale(bn.weight, bn.running_var, bn.eps)
            else:
                expr = BnShift(bn.bias, bn.running_mean, bn.weight, bn.running_var, bn.eps)
        if expr is None:
            key = f"lit{len(literals)}"
            literals[key] = value.detach().clone()
            expr = Literal(key)
        try:
            expr = conform(expr, tuple(value.shape), value.dtype, source_specs, literals)
        except MappingError as e:
            problems.append(f"engine weight {name!r}: {e}")
            continue
        records.append(WeightRecord(name, tuple(value.shape), value.dtype, expr))
    return Derivation(tuple(records), literals, tuple(problems))


def meta_sources(specs: Mapping[str, WeightSpec]) -> dict[str, torch.Tensor]:
    """Shape-and-dtype-only stand-ins for checkpoint tensors (no memory, no compute)."""
    return {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()}


def conform(expr: Expr, shape: tuple[int, ...], dtype: torch.dtype, source_specs: Mapping[str, WeightSpec],
            literals: Mapping[str, torch.Tensor]) -> Expr:
    """``expr`` with the reshape/cast that makes it produce ``shape``/``dtype`` (a converter's own
    ``to(dtype)`` or a flattening); a :class:`MappingError` when the element count differs."""
    lits = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in literals.items()}
    try:
        probe = evaluate(expr, meta_sources(source_specs), lits)
    except RuntimeError as e:
        raise MappingError(f"its recipe does not apply to the checkpoint's shapes: {e}") from e
    if probe.numel() != math.prod(shape):
        raise MappingError(f"recipe gives {probe.numel()} elements, the engine holds {math.prod(shape)}")
    if tuple(probe.shape) != shape:
        expr = Reshape(expr, shape)
    if probe.dtype != dtype:
        expr = Cast(expr, dtype)
    return expr


# --------------------------------------------------------------------------- verification
def random_sources(specs: Mapping[str, WeightSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """An independent weight set: floats uniform in [0.5, 1.5) (non-zero, positive: valid variances).

    Integer and bool tensors are kept out (they are indices or masks, not weights to vary).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.dtype.is_floating_point:
            out[name] = (torch.rand(spec.shape, generator=gen, dtype=torch.float64) + 0.5).to(spec.dtype)
    return out


def compare_records(records: Sequence[WeightRecord], sources: Mapping[str, torch.Tensor],
                    literals: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    *, rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """Problems where a record, evaluated on ``sources``, differs from Torch-TensorRT's ``expected``."""
    problems = []
    for r in records:
        if r.name not in expected:
            problems.append(f"engine weight {r.name!r}: Torch-TensorRT no longer produces it")
            continue
        want = expected[r.name]
        try:
            got = materialize(r, {k: v.to(want.device) for k, v in sources.items()},
                              {k: v.to(want.device) for k, v in literals.items()})
        except MappingError as e:
            problems.append(str(e))
            continue
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            problems.append(f"engine weight {r.name!r}: record gives {tuple(got.shape)} "
                            f"{dtype_name(got.dtype)}, Torch-TensorRT {tuple(want.shape)} "
                            f"{dtype_name(want.dtype)}")
            continue
        if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol):
            err = (got.double() - want.double()).abs().max().item()
            kind = "a constant" if isinstance(r.expr, Literal) else "its record"
            problems.append(f"engine weight {r.name!r} depends on the checkpoint in a way hotswap cannot "
                            f"map (treated as {kind}; max diff {err:.3g} for other weights): it would "
                            "stay baked in")
    return problems
