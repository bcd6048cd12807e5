"""Expressions: how one engine weight is computed from checkpoint tensors, and their pure torch maths.

An :data:`Expr` is a small tree over checkpoint tensors (:class:`Source`) and stored constants
(:class:`Literal`): permutes, reshapes, casts and the BatchNorm folds Torch-TensorRT applies (with
the layer's own ``eps``). :func:`evaluate` computes it; :func:`expr_sources` and
:func:`expr_literals` say what it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

import torch


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


__all__ = [
    "BnScale", "BnShift", "Cast", "ConvBnBias", "ConvBnWeight", "Expr", "Literal", "MappingError", "Permute",
    "Reshape", "Source", "bn_scale", "bn_shift", "evaluate", "expr_literals", "expr_sources", "fold_conv_bn_bias",
    "fold_conv_bn_weight", "transpose",
]
