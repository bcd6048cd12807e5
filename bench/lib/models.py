"""The benchmark models: the MLP the GPU benchmarks serve (``FACTORY``, the name Triton configs give as
``model_factory``) and the example transformer sized for the CPU refit benchmark."""

from __future__ import annotations

import numpy as np
import torch

from serving.examples import TRANSFORMER
from serving.specs import BuildSpec, TensorSpec, dtype_from_name

GB = 1e9
#: what a served model's ``model_factory`` names to get :func:`big_mlp`
FACTORY = "bench.lib.models:big_mlp"
#: the marker of version k is k * MARKER_STEP; tanh outputs stay within +-1 of it
MARKER_STEP = 10.0


class BigMLP(torch.nn.Module):
    """``layers`` square Linear layers with tanh, plus a marker bias that identifies the version."""

    def __init__(self, width: int, layers: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(width, width, bias=False, device=device, dtype=dtype) for _ in range(layers))
        self.marker = torch.nn.Parameter(torch.zeros(width, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x + self.marker


def big_mlp(width: int = 1024, layers: int = 2, device: str = "cpu", dtype: str = "float16") -> BigMLP:
    """The benchmark's model, built directly on ``device`` (no host copy of a 16 GB model)."""
    return BigMLP(width, layers, device, dtype_from_name(dtype))


def shape_for(size_gb: float, dtype: torch.dtype, width: int) -> tuple[int, int]:
    """(width, layers) whose weights come to about ``size_gb``; narrower for tiny dry runs. Pure."""
    itemsize = dtype.itemsize
    while width > 64 and width * width * itemsize * 2 > size_gb * GB:
        width //= 2
    return width, max(1, round(size_gb * GB / (width * width * itemsize)))


def mlp_bytes(width: int, layers: int, itemsize: int = 4) -> int:
    """Bytes of the MLP's weights (layers and marker). Pure."""
    return itemsize * width * (width * layers + 1)


def version_of(y: torch.Tensor) -> int:
    """The version whose marker an output of the MLP carries."""
    return round(float(y.float().mean()) / MARKER_STEP)


def random_mlp_state(seed: int, width: int, layers: int) -> dict[str, torch.Tensor]:
    """Random float32 weights of the MLP, marker included, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.weight": torch.randn(width, width, generator=g) / width ** 0.5 for i in range(layers)}
    sd["marker"] = torch.randn(width, generator=g)
    return sd


def mlp_output(sd: dict[str, torch.Tensor], x: torch.Tensor, device: str) -> np.ndarray:
    """What the float32 MLP with weights ``sd`` answers to ``x``."""
    module = BigMLP(x.shape[1], len(sd) - 1, device, torch.float32)
    module.load_state_dict(sd)
    with torch.inference_mode():
        return module(x.to(device)).cpu().numpy()


def transformer_kwargs(target_mb: float) -> dict[str, int]:
    """Sizes of the example transformer whose float32 weights reach about ``target_mb``. Pure."""
    d, ff = 512, 2048
    per_layer_mb = (4 * d * d + 2 * d * ff) * 4 / 1e6
    layers = max(1, round(target_mb / per_layer_mb))
    return {"d_model": d, "n_heads": 8, "d_ff": ff, "n_layers": layers, "vocab": 1000, "seq_len": 16}


def transformer_spec(kwargs: dict[str, int]) -> BuildSpec:
    """The example transformer with ``kwargs``, a batch of up to 4 rows of 16 tokens, on the CPU."""
    return BuildSpec(factory=TRANSFORMER, inputs=(TensorSpec("TOKENS", torch.int64, (16,)),), max_batch=4,
                     factory_kwargs=tuple(sorted(kwargs.items())))
