"""Write checkpoints the way the publish protocol recommends: a hidden temp name, then a rename."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``tensors`` to ``out`` atomically (readers never see a half-written file)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    tmp.replace(out)
    return out
