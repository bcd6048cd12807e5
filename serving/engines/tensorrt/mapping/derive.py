"""Deriving the records of a freshly built engine from Torch-TensorRT's own bookkeeping, and checking them.

Torch-TensorRT's ``ConversionContext.weight_refit_map`` (engine weight name -> the exact tensor the
converter handed to TensorRT, filled by ``to_trt_weights`` in ``dynamo/conversion/converter_utils.py``)
is tied back to checkpoint names by object identity with the tensors the interpreter fetched for
``get_attr`` nodes (:func:`~.provenance.annotate_constant_exprs` leaves each folded constant's expression
on its node first) and by the converter naming scheme ``[LAYER]-[<ir>_ops.<target>]-[<node>] ROLE``
(:func:`~.provenance.parse_weight_name`). Nothing is found by guessing names or by matching values;
:func:`compare_records` checks every record against Torch-TensorRT's result for an independent
random weight set (:func:`random_sources`) before the map is trusted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from serving.engines.tensorrt.mapping.expr import (
    BnScale,
    BnShift,
    Cast,
    Expr,
    Literal,
    MappingError,
    Reshape,
    evaluate,
)
from serving.engines.tensorrt.mapping.provenance import node_expr, parse_weight_name
from serving.engines.tensorrt.mapping.records import WeightRecord, materialize
from serving.specs import WeightSpec, dtype_name

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


__all__ = ["BN_ARG_POSITIONS", "BatchNormNode", "Derivation", "batch_norm_nodes", "compare_records", "conform",
           "derive_records", "meta_sources", "random_sources"]
