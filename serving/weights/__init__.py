"""Reading and validating checkpoints: safetensors (single or sharded), and torch pickles on request."""

from __future__ import annotations

from serving.weights.checkpoint import (
    CheckpointCandidate,
    CheckpointPolicy,
    FileStat,
    describe_checkpoint,
    detect_checkpoint,
    read_tensors,
)
from serving.weights.loader import LoadedWeights, load_weights
from serving.weights.safetensors_header import SAFETENSORS_DTYPES, TensorMeta, parse_header, read_header
from serving.weights.validate import (
    CASTABLE_FLOATS,
    ValidationPolicy,
    cast_allowed,
    check_metadata,
    conform,
    unexpected_names,
)

__all__ = [
    "CASTABLE_FLOATS",
    "SAFETENSORS_DTYPES",
    "CheckpointCandidate",
    "CheckpointPolicy",
    "FileStat",
    "LoadedWeights",
    "TensorMeta",
    "ValidationPolicy",
    "cast_allowed",
    "check_metadata",
    "conform",
    "describe_checkpoint",
    "detect_checkpoint",
    "load_weights",
    "parse_header",
    "read_header",
    "read_tensors",
    "unexpected_names",
]
