"""Write a checkpoint file the way the publish protocol recommends (see :mod:`serving.publish.writer`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``tensors`` to ``out`` atomically (readers never see a half-written file): written under a
    hidden temporary name beside it, flushed, then renamed."""
    from safetensors.torch import save_file

    from serving.publish import staging

    with staging(out.parent, out.name) as staged:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staged.temp), metadata=dict(metadata or {}))
    return out
