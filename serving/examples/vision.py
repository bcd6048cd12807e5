"""torchvision models as factories: ``torchvision_model(name="resnet50")`` with random weights.

The weights come from the watched folder (a ``state_dict`` saved with ``safetensors.torch.save_file``),
never from torchvision's download. torchvision must match the installed torch (PyPI's torchvision
is a CUDA build: it does not import with a CPU-only torch).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def torchvision_model(name: str = "resnet50", **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``: images ``[B, 3, H, W]`` -> logits."""
    import torchvision

    module: nn.Module = torchvision.models.get_model(name, weights=None, **kwargs)
    return module
