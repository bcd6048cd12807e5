"""Where an engine weight comes from: Torch-TensorRT's weight names, and expressions left on FX nodes.

Torch-TensorRT names each engine weight after the converter that made it (:func:`parse_weight_name`).
Its constant folding replaces a node computed only from checkpoint tensors (a transposed ``nn.Linear``
weight, a cast) with a new ``get_attr`` node; :func:`annotate_constant_exprs` leaves the node's
expression in its ``meta`` first, which the folding copies onto the new node, so :func:`node_expr`
can tell what a folded constant is made of.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from serving.engines.tensorrt.mapping.expr import Cast, Expr, Permute, Reshape, Source, transpose
from serving.engines.tensorrt.mapping.records import expr_from_json, expr_to_json

#: ``node.meta`` key under which :func:`annotate_constant_exprs` leaves a node's expression
META_KEY = "hotswap_expr"


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


__all__ = ["META_KEY", "ParsedWeightName", "annotate_constant_exprs", "node_expr", "parse_weight_name"]
