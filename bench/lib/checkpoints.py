"""Checkpoint writers of the benchmarks: safetensors written tensor by tensor, and versions of the MLP
published as sharded directories (one large layers shard hard-linked between versions, a small marker
shard of each version's own), renamed in as ``hotswap publish`` does."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lib.models import MARKER_STEP, BigMLP
from serving.publish import staging

_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors_stream(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor (``tensors`` may repeat the same host tensor)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))


def write_layers(path: Path, width: int, layers: int, store: torch.dtype, device: str) -> None:
    """The MLP's layers shard: a few distinct random layers, cycled (the page cache does not care), made on
    ``device`` (fast for 16 GB) and read back once so that the file is in the page cache."""
    distinct = []
    for i in range(min(layers, 4)):
        g = torch.Generator(device=device).manual_seed(i)
        w = torch.randn(width, width, generator=g, device=device, dtype=torch.float32) / width ** 0.5
        distinct.append(w.to(store).cpu())
    write_safetensors_stream(path, [(f"layers.{i}.weight", distinct[i % len(distinct)]) for i in range(layers)])
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def publish_sharded(folder: Path, name: str, layers_file: Path, layers: int, marker: Path | torch.Tensor,
                    clock: Callable[[], float] = time.monotonic) -> tuple[Path, float]:
    """A sharded checkpoint directory ``name`` renamed into ``folder``: the layers shard hard-linked, the
    marker shard linked (a path) or written (a tensor). Returns its path and the time of the rename."""
    with staging(folder, name, directory=True) as staged:
        os.link(layers_file, staged.temp / "layers.safetensors")
        if isinstance(marker, Path):
            os.link(marker, staged.temp / "marker.safetensors")
        else:
            write_safetensors_stream(staged.temp / "marker.safetensors", [("marker", marker)])
        weight_map = {f"layers.{i}.weight": "layers.safetensors" for i in range(layers)}
        weight_map["marker"] = "marker.safetensors"
        (staged.temp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
        staged.seal()
        t = clock()
        final = staged.commit()
    return final, t


@dataclass
class Checkpoints:
    """Versions of one MLP in the engine's folder: a shared layers shard, a marker shard per version."""

    root: Path
    width: int
    layers: int
    dtype: torch.dtype
    nbytes: int
    count: int = 0
    #: the dtype the layers are stored in (None: the engine's)
    store: torch.dtype | None = None

    def publish(self, k: int) -> tuple[Path, float]:
        """Make version ``k`` appear by a rename; returns its path and the time of the rename."""
        name = f"v{k}-{self.count}"
        self.count += 1
        marker = torch.full((self.width,), k * MARKER_STEP, dtype=self.dtype)
        return publish_sharded(self.root, name, self.root / "layers.safetensors", self.layers, marker,
                               clock=time.perf_counter)


def make_checkpoints(root: Path, width: int, layers: int, dtype: torch.dtype, device: str,
                     ckpt_dtype: torch.dtype | None = None) -> Checkpoints:
    """The layers shard of an MLP written once (in ``ckpt_dtype``, else ``dtype``), page-cached."""
    root.mkdir(parents=True, exist_ok=True)
    store = ckpt_dtype or dtype
    write_layers(root / "layers.safetensors", width, layers, store, device)
    nbytes = layers * width * width * dtype.itemsize + width * dtype.itemsize  # in the engine's dtype
    return Checkpoints(root, width, layers, dtype, nbytes, store=store)


class Sources:
    """The float32 versions of one MLP size for a served model: one layers file, one marker file each."""

    def __init__(self, root: Path, width: int, layers: int, versions: int, device: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.width, self.layers = root, width, layers
        self.layers_file = root / "layers.safetensors"
        write_layers(self.layers_file, width, layers, torch.float32, device)
        self.markers = {}
        for k in range(versions + 1):
            self.markers[f"v{k}"] = root / f"marker-v{k}" / "marker.safetensors"
            self.markers[f"v{k}"].parent.mkdir()
            write_safetensors_stream(self.markers[f"v{k}"], [("marker", torch.full((width,), k * MARKER_STEP))])
        self.model_bytes = 4 * width * (width * layers + 1)

    def expected(self, x: torch.Tensor, device: str) -> dict[str, np.ndarray]:
        """What each version answers to ``x``: the layers' output (computed once) plus its marker."""
        from safetensors.torch import load_file

        module = BigMLP(self.width, self.layers, device, torch.float32)
        module.load_state_dict({**load_file(self.layers_file, device=device),
                                "marker": torch.zeros(self.width, device=device)})
        with torch.inference_mode():
            h = module(x.to(device)).cpu().numpy()
        del module
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {v: h + float(v[1:]) * MARKER_STEP for v in self.markers}

    def files(self, version: str) -> list[Path]:
        return [self.layers_file, self.markers[version]]

    def evict(self) -> None:
        """Drop the checkpoint's pages from the page cache (a file not read since it was written)."""
        for f in (self.layers_file, *self.markers.values()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def publish(self, folder: Path, version: str, name: str) -> float:
        """``version`` as a sharded directory ``name`` renamed into ``folder``; the time of the rename."""
        return publish_sharded(folder, name, self.layers_file, self.layers, self.markers[version])[1]


def remove_versions(root: Path) -> None:
    """Remove the published version directories (``v*``) under ``root``."""
    for p in root.glob("v*"):
        shutil.rmtree(p, ignore_errors=True)
