"""Small example models, fast enough for CI on two cores.

Each factory is importable as ``serving.examples.<module>:<function>``; ``INPUTS`` and
``OUTPUTS`` describe their tensors without the batch dimension, as Triton does.
"""

from __future__ import annotations

import torch

from serving.specs import BuildSpec, TensorSpec

TRANSFORMER = "serving.examples.transformer:tiny_transformer"
CNN = "serving.examples.cnn:tiny_cnn"

_IO: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    TRANSFORMER: (
        (TensorSpec("TOKENS", torch.int64, (16,)),),
        (TensorSpec("LOGITS", torch.float32, (5,)),),
    ),
    CNN: (
        (TensorSpec("IMAGE", torch.float32, (3, 32, 32)),),
        (TensorSpec("LOGITS", torch.float32, (10,)),),
    ),
}


def example_build_spec(factory: str, *, device: str = "cpu", max_batch: int = 8) -> BuildSpec:
    """The :class:`BuildSpec` of an example model."""
    inputs, outputs = _IO[factory]
    return BuildSpec(factory=factory, inputs=inputs, outputs=outputs, max_batch=max_batch, device=device)
