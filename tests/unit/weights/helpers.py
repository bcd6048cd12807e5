"""Helpers for the checkpoint tests: tiny modules saved into tmp_path, a spy on safe_open."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import serving.weights.checkpoint as checkpoint_mod
from serving.specs import WeightSpec

NUM_BATCHES = "1.num_batches_tracked"


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Linear -> BatchNorm1d -> Linear: float weights plus BatchNorm's int64 ``num_batches_tracked``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def specs_of(sd: Mapping[str, torch.Tensor], skip: tuple[str, ...] = (NUM_BATCHES,)) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items() if k not in skip}


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(path), metadata=metadata)
    return path


def save_sharded(directory: Path, shards: Mapping[str, Mapping[str, torch.Tensor]]) -> Path:
    """A Hugging Face style sharded checkpoint: ``{shard file name: tensors}`` plus the index."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for file, tensors in shards.items():
        save(directory / file, tensors)
        weight_map.update(dict.fromkeys(tensors, file))
    write_index(directory, weight_map)
    return directory


def write_index(directory: Path, weight_map: Mapping[str, str]) -> None:
    doc = {"metadata": {"total_size": 0}, "weight_map": dict(weight_map)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(doc))


def raw_safetensors(header: Mapping[str, Any], data: bytes = b"", pad: int = 0) -> bytes:
    """Hand-built safetensors bytes, to lie about offsets, dtypes and lengths."""
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


class SafeOpenSpy:
    """Replaces ``SafetensorsFile`` in the checkpoint module and records what is opened and read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read: list[str] = []
        self.on_get: Any = None  # called as on_get(file, name) after each get_tensor
        real = checkpoint_mod.SafetensorsFile
        spy = self

        class Handle:
            def __init__(self, file: Path) -> None:
                spy.opened.append(Path(file).name)
                self._file = str(file)
                self._cm = real(file)

            def __enter__(self) -> Handle:
                self._f = self._cm.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._cm.__exit__(*exc)

            def keys(self) -> list[str]:
                return list(self._f.keys())

            def get_tensor(self, name: str) -> torch.Tensor:
                t = self._f.get_tensor(name)
                spy.read.append(name)
                if spy.on_get is not None:
                    spy.on_get(self._file, name)
                return t

        monkeypatch.setattr(checkpoint_mod, "SafetensorsFile", Handle)

