"""How every refittable TensorRT weight is computed from checkpoint tensors: pure torch, JSON records.

A TensorRT engine built by Torch-TensorRT does not hold the checkpoint's tensors as they are:
a ``nn.Linear`` weight goes in transposed (``aten.permute`` is constant-folded before conversion),
a BatchNorm after a convolution becomes a per-channel ``SCALE``/``SHIFT`` pair computed with the
layer's own ``eps``, and tensors may be cast. This package describes each engine weight as a small
expression over checkpoint tensors and evaluates it (:mod:`.expr`), keeps one record per engine
weight in a JSON-serializable weight map stored with the cached engine (:mod:`.records`), and
derives those records from Torch-TensorRT's own bookkeeping (weight names and the expressions left on
folded FX nodes: :mod:`.provenance`), then checks them (:mod:`.derive`).
"""

from __future__ import annotations

from serving.engines.tensorrt.mapping.derive import (
    BN_ARG_POSITIONS,
    BatchNormNode,
    Derivation,
    batch_norm_nodes,
    compare_records,
    conform,
    derive_records,
    meta_sources,
    random_sources,
)
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
    bn_scale,
    bn_shift,
    evaluate,
    expr_literals,
    expr_sources,
    fold_conv_bn_bias,
    fold_conv_bn_weight,
    transpose,
)
from serving.engines.tensorrt.mapping.provenance import (
    META_KEY,
    ParsedWeightName,
    annotate_constant_exprs,
    node_expr,
    parse_weight_name,
)
from serving.engines.tensorrt.mapping.records import (
    MAPPING_SCHEMA,
    WeightMap,
    WeightRecord,
    check_map_consistency,
    expr_from_json,
    expr_to_json,
    materialize,
)

__all__ = [
    "BN_ARG_POSITIONS", "MAPPING_SCHEMA", "META_KEY", "BatchNormNode", "BnScale", "BnShift", "Cast", "ConvBnBias",
    "ConvBnWeight", "Derivation", "Expr", "Literal", "MappingError", "ParsedWeightName", "Permute", "Reshape",
    "Source", "WeightMap", "WeightRecord", "annotate_constant_exprs", "batch_norm_nodes", "bn_scale", "bn_shift",
    "check_map_consistency", "compare_records", "conform", "derive_records", "evaluate", "expr_from_json",
    "expr_literals", "expr_sources", "expr_to_json", "fold_conv_bn_bias", "fold_conv_bn_weight", "materialize",
    "meta_sources", "node_expr", "parse_weight_name", "random_sources", "transpose",
]
