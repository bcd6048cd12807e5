"""The models a soak serves, the versions it publishes into their folders, and what each version answers.

* :class:`ExampleModels`: the example repository (``model_repository/``: ``tiny_transformer`` on AOTInductor,
  ``tiny_cnn`` on eager with two instances); single-file versions from random state dicts.
* :class:`MlpModels`: the benchmark MLP (``bench.lib.models:big_mlp``) at a size in GB on one instance of the
  given kind, in a repository written by :func:`bench.lib.triton_repo.make_repository`; each version a
  sharded directory whose large layers shard is hard-linked from one file and whose marker shard is its own
  (random), so every swap reads and transfers the whole model.

Both publish a :class:`~bench.lib.soak_plan.Step` with the tool it names, and give the output each version
must answer (its reference) before it is published. Adapters' references are computed here, by merging
``scale * B @ A`` into the weights by hand (not with the code under test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lib.models import MARKER_STEP, BigMLP, big_mlp, mlp_bytes, shape_for
from bench.lib.soak_plan import FIRST, Step
from bench.lib.triton_repo import make_repository
from serving.examples import CNN, TRANSFORMER
from serving.factory import build_module
from serving.publish import publish, publish_tensors
from serving.weights.lora import random_adapter, save_adapter
from serving.weights.random_state import random_state_dict

PEFT_PREFIX = "base_model.model."
#: adapters' rank, alpha and the modules they adapt, per model
LORA_R, LORA_ALPHA = 4, 8.0
EXAMPLES = {"tiny_transformer": (TRANSFORMER, "TOKENS", "INT64", ("q_proj", "v_proj")),
            "tiny_cnn": (CNN, "IMAGE", "FP32", ("conv2", "head"))}
ROOT = Path(__file__).resolve().parents[2]


def merged_state(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                 scale: float) -> dict[str, torch.Tensor]:
    """``state`` with a PEFT adapter's ``scale * B @ A`` added to each adapted Linear or Conv2d weight. Pure."""
    out = dict(state)
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        w = out[f"{module}.weight"]
        delta = (b.flatten(1).double() @ a.flatten(1).double()).reshape(b.shape[0], *a.shape[1:])
        out[f"{module}.weight"] = (w.double() + scale * delta.to(w.device)).to(w.dtype)
    return out


def write_safetensors_plain(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


class ExampleModels:
    """The example repository's two models, single-file versions of random weights."""

    kind = "KIND_CPU"

    def __init__(self, work: Path, repository: Path = ROOT / "model_repository", batch: int = 2) -> None:
        self.repository = repository
        self.names = list(EXAMPLES)
        self.staged = work / "staged"
        self.staged.mkdir(parents=True, exist_ok=True)
        self.modules = {m: build_module(EXAMPLES[m][0]) for m in self.names}
        g = torch.Generator().manual_seed(3)
        self.inputs = {"tiny_transformer": torch.randint(0, 1000, (batch, 16), generator=g),
                       "tiny_cnn": torch.randn(batch, 3, 32, 32, generator=g)}
        self.model_bytes = {m: sum(t.numel() * t.element_size() for t in mod.state_dict().values())
                            for m, mod in self.modules.items()}
        self._seeds: dict[str, int] = dict.fromkeys(self.names, 0)

    output = "LOGITS"

    def request(self, model: str) -> tuple[str, np.ndarray, str]:
        """The input's name, the fixed input, its Triton datatype."""
        _, name, dtype, _ = EXAMPLES[model]
        return name, self.inputs[model].numpy(), dtype

    def _state(self, model: str, seed: int) -> dict[str, torch.Tensor]:
        return random_state_dict(self.modules[model], seed)

    def _answer(self, model: str, state: dict[str, torch.Tensor]) -> np.ndarray:
        module = self.modules[model]
        module.load_state_dict(state)
        with torch.inference_mode():
            return module(self.inputs[model]).numpy()

    def _adapter(self, model: str, seed: int) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
        return random_adapter(self.modules[model], targets=EXAMPLES[model][3], r=LORA_R, alpha=LORA_ALPHA, seed=seed)

    def first(self, folder: Path, model: str) -> np.ndarray:
        """Write the version every folder starts with (before the server starts); its reference."""
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_plain(self._state(model, 0), folder / f"{FIRST}.safetensors")
        return self._answer(model, self._state(model, 0))

    def reference(self, step: Step) -> np.ndarray:
        """What ``step``'s version answers to the fixed input."""
        base_seed = step.seed if step.action == "base" else self._seeds[step.model]
        state = self._state(step.model, base_seed)
        if step.action == "adapter":
            _, tensors = self._adapter(step.model, step.seed)
            state = merged_state(state, tensors, LORA_ALPHA / LORA_R)
        return self._answer(step.model, state)

    def publish(self, step: Step, folder: Path) -> None:
        """Publish ``step`` into ``folder`` with its tool."""
        m = step.model
        if step.action == "base":
            self._seeds[m] = step.seed
            self._publish_file(step.tool, self._state(m, step.seed), step.entry, folder)
        elif step.action == "adapter":
            config, tensors = self._adapter(m, step.seed)
            save_adapter(folder / step.entry, config, tensors)  # what `hotswap lora random -o DIR` runs
        elif step.tool == "touch":
            os.utime(folder / f"{step.entry}.safetensors")
        else:
            self._publish_file("publish", self._state(m, self._seeds[m]), step.entry, folder)

    def _publish_file(self, tool: str, state: dict[str, torch.Tensor], version: str, folder: Path) -> None:
        name = f"{version}.safetensors"
        if tool == "publish_tensors":
            publish_tensors(state, folder, version=version)
        elif tool == "rename":
            write_safetensors_plain(state, folder / f".{name}.tmp")
            os.rename(folder / f".{name}.tmp", folder / name)
        elif tool in ("publish", "copy"):
            src = self.staged / name
            write_safetensors_plain(state, src)
            try:
                if tool == "publish":
                    publish(src, folder, version=version)
                else:
                    shutil.copyfile(src, folder / name)
            finally:
                src.unlink()
        else:
            raise ValueError(f"unknown tool {tool!r}")


class MlpModels:
    """The benchmark MLP at ``size_gb`` (float32) on one instance of ``kind``."""

    output = "Y"

    def __init__(self, work: Path, size_gb: float, kind: str, width: int = 4096, batch: int = 2) -> None:
        from bench.lib.checkpoints import write_layers

        self.kind = kind
        self.device = "cuda" if kind == "KIND_GPU" else "cpu"
        self.width, self.layers = shape_for(size_gb, torch.float32, width)
        self.repository = work / "repository"
        self.names = make_repository(self.repository, self.width, self.layers, ["double_buffer"], kind,
                                     version_output=False, version_utf8=True)
        self.sources = work / "sources"
        self.sources.mkdir(parents=True)
        self.layers_file = self.sources / "layers.safetensors"
        write_layers(self.layers_file, self.width, self.layers, torch.float32, self.device)
        self.model_bytes = dict.fromkeys(self.names, mlp_bytes(self.width, self.layers))
        self.x = torch.randn(batch, self.width, generator=torch.Generator().manual_seed(7))
        # the layers on the device, once: each version's answer is theirs plus its marker
        from safetensors.torch import load_file

        self._module = big_mlp(self.width, self.layers, self.device, "float32")
        self._module.load_state_dict({**load_file(self.layers_file, device=self.device),
                                      "marker": torch.zeros(self.width, device=self.device)})
        self._hidden = self._forward()
        self._markers: dict[str, torch.Tensor] = {}
        self._live_marker: dict[str, torch.Tensor] = {}

    def request(self, model: str) -> tuple[str, np.ndarray, str]:
        return "X", self.x.numpy(), "FP32"

    def _forward(self) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(self._module(self.x.to(self.device)).cpu().numpy())

    def _marker(self, seed: int) -> torch.Tensor:
        return torch.randn(self.width, generator=torch.Generator().manual_seed(seed)) * MARKER_STEP

    def _adapter(self, seed: int) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
        meta = BigMLP(self.width, self.layers, "meta", torch.float32)
        return random_adapter(meta, targets=["layers.0"], r=LORA_R, alpha=LORA_ALPHA, seed=seed)

    def _write_version(self, version: str, marker: torch.Tensor) -> Path:
        """The version's sharded directory among the sources: the layers hard-linked, its own marker."""
        from bench.lib.checkpoints import write_safetensors_stream

        src = self.sources / version
        src.mkdir()
        os.link(self.layers_file, src / "layers.safetensors")
        write_safetensors_stream(src / "marker.safetensors", [("marker", marker)])
        weight_map = {f"layers.{i}.weight": "layers.safetensors" for i in range(self.layers)}
        weight_map["marker"] = "marker.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return src

    def first(self, folder: Path, model: str) -> np.ndarray:
        marker = self._marker(0)
        self._live_marker[model] = marker
        src = self._write_version(FIRST, marker)
        folder.mkdir(parents=True, exist_ok=True)
        publish(src, folder, version=FIRST, link=True, manifest=False)
        return self._hidden + marker.numpy()

    def reference(self, step: Step) -> np.ndarray:
        if step.action == "base":
            self._markers[step.entry] = self._marker(step.seed)
            return self._hidden + self._markers[step.entry].numpy()
        marker = self._live_marker[step.model].numpy()
        if step.action == "unadapt":
            return self._hidden + marker
        _, tensors = self._adapter(step.seed)
        first: torch.nn.Linear = self._module.layers[0]  # type: ignore[assignment]
        w = first.weight
        kept = w.detach().clone()
        try:
            with torch.no_grad():
                merged = merged_state({"layers.0.weight": kept}, tensors, LORA_ALPHA / LORA_R)
                w.copy_(merged["layers.0.weight"])
            return self._forward() + marker
        finally:
            with torch.no_grad():
                w.copy_(kept)

    def publish(self, step: Step, folder: Path) -> None:
        if step.action == "adapter":
            config, tensors = self._adapter(step.seed)
            save_adapter(folder / step.entry, config, tensors)
            return
        if step.action == "unadapt":
            if step.tool == "touch":
                os.utime(folder / step.entry)
            else:
                publish(self.sources / step.entry, folder, version=step.entry, link=True)
            return
        marker = self._markers.pop(step.entry)
        src = self._write_version(step.entry, marker)
        if step.tool == "publish":
            publish(src, folder, version=step.entry, link=True)  # `hotswap publish`: links, MANIFEST.json
        elif step.tool == "rename":
            tmp = folder / f".{step.entry}.tmp"
            tmp.mkdir()
            for f in src.iterdir():
                os.link(f, tmp / f.name)
            os.rename(tmp, folder / step.entry)
        else:
            raise ValueError(f"unknown tool {step.tool!r}")
        self._live_marker[step.model] = marker
        self.prune_sources(keep=step.entry)

    def prune_sources(self, keep: str) -> None:
        """Remove every version's source directory but ``keep``'s (the live base, published again to take
        an adapter off)."""
        for d in self.sources.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        del self._module
        if self.device == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def describe(models: Any) -> dict[str, object]:
    """What the JSON says about the served models."""
    out: dict[str, object] = {"names": list(models.names), "bytes": dict(models.model_bytes)}
    if isinstance(models, MlpModels):
        out.update(factory="bench.lib.models:big_mlp", width=models.width, layers=models.layers, dtype="float32",
                   engine="eager", instance=models.kind, strategy="double_buffer")
    else:
        out.update(repository="model_repository/")
    return out
