"""PEFT adapter directories: reading one (size-capped, inside the allowed root) and writing one."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from serving.errors import CheckpointError, reading
from serving.publish.protocol import ADAPTER_CONFIG
from serving.specs import WeightSpec
from serving.weights.checkpoint import CheckpointPolicy, describe_checkpoint, detect_checkpoint, read_tensors
from serving.weights.lora.adapter import PEFT_PREFIX, LoraAdapter, build_adapter
from serving.weights.lora.config import LoraConfig

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_CONFIG_BYTES = 1 << 20


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding an ``adapter_config.json``."""
    try:
        return path.is_dir() and (path / ADAPTER_CONFIG).exists()
    except OSError:
        return False


def read_adapter_config(path: Path, policy: CheckpointPolicy | None = None) -> dict[str, object]:
    """Read ``adapter_config.json`` of an adapter directory as a dict (size-capped, root-checked)."""
    policy = policy or CheckpointPolicy()
    cfg = path / ADAPTER_CONFIG
    with reading(cfg, gone="missing", gone_reason="not_found"):
        real = cfg.resolve(strict=True)
        if policy.root is not None and not real.is_relative_to(policy.root.resolve()):
            raise CheckpointError(f"{cfg} -> {real}: outside the allowed root {policy.root}", reason="outside_root")
        st = os.stat(real)
        if not os.path.isfile(real):
            raise CheckpointError(f"{cfg}: not a regular file", reason="lora_invalid")
        if st.st_size > _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{cfg}: {st.st_size} bytes; an adapter config is small JSON", reason="lora_invalid")
        raw = real.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})", reason="lora_invalid") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg}: a JSON {type(doc).__name__}, expected an object", reason="lora_invalid")
    return doc


def adapter_weights_file(path: Path) -> Path | None:
    """The adapter's weights file (safetensors preferred), or None."""
    for name in ADAPTER_WEIGHTS:
        if (path / name).exists() or (path / name).is_symlink():
            return path / name
    return None


def read_adapter(path: Path, specs: Mapping[str, WeightSpec], policy: CheckpointPolicy | None = None,
                 *, name: str | None = None) -> LoraAdapter:
    """Read and validate a PEFT adapter directory against the base weight specs.

    The weights file goes through :func:`~serving.weights.detect_checkpoint` (symlinks resolved and
    checked against ``policy.root``, size cap, pickles only with ``allow_pickle`` and then with
    ``weights_only=True``) and is read whole.
    """
    path = Path(path)
    policy = policy or CheckpointPolicy()
    config = LoraConfig.from_dict(read_adapter_config(path, policy), str(path))
    weights = adapter_weights_file(path)
    if weights is None:
        raise CheckpointError(f"{path}: a PEFT adapter directory needs {ADAPTER_WEIGHTS[0]} next to "
                              f"{ADAPTER_CONFIG}", reason="lora_invalid")
    candidate = detect_checkpoint(weights, policy)
    metas = describe_checkpoint(candidate, policy)
    tensors = read_tensors(candidate, list(metas), policy)
    return build_adapter(config, tensors, specs, source=str(path), name=name or path.name)


# ---------------------------------------------------------------- writing (tests, smoke checks)


def random_adapter(module: torch.nn.Module, *, targets: Sequence[str], r: int = 4, alpha: float = 8.0,
                   seed: int = 0, std: float = 0.05, use_rslora: bool = False,
                   rank_pattern: Mapping[str, int] | None = None,
                   alpha_pattern: Mapping[str, float] | None = None,
                   ) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """A valid PEFT adapter for ``module``: ``(adapter_config dict, tensors)``.

    Targets are module-name suffixes (as in ``target_modules``); Linear, Embedding and Conv2d
    modules are supported. Unlike PEFT's initialisation, B is random too, so the adapter changes
    the outputs.
    """
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
              "use_rslora": use_rslora, "fan_in_fan_out": False, "bias": "none",
              "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    parsed = LoraConfig.from_dict(config, "random_adapter")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).contiguous()

    for name, mod in module.named_modules():
        if not name or not parsed.targets(name) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        rank = parsed.rank_for(name)
        prefix = PEFT_PREFIX + name
        if isinstance(mod, torch.nn.Linear):
            tensors[f"{prefix}.lora_A.weight"] = randn(rank, mod.in_features)
            tensors[f"{prefix}.lora_B.weight"] = randn(mod.out_features, rank)
        elif isinstance(mod, torch.nn.Embedding):
            tensors[f"{prefix}.lora_embedding_A"] = randn(rank, mod.num_embeddings)
            tensors[f"{prefix}.lora_embedding_B"] = randn(mod.embedding_dim, rank)
        elif isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            tensors[f"{prefix}.lora_A.weight"] = randn(rank, mod.in_channels // mod.groups, kh, kw)
            tensors[f"{prefix}.lora_B.weight"] = randn(mod.out_channels, rank, 1, 1)
    if not tensors:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d))})
        raise ValueError(f"no Linear/Embedding/Conv2d module matches targets {list(targets)}; candidates: {names}")
    return config, tensors


def save_adapter(directory: Path, config: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter directory atomically: into a hidden temp dir beside it, then rename."""
    from safetensors.torch import save_file

    from serving.publish import staging

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; publish adapters under a new name")
    with staging(directory.parent, directory.name, directory=True) as staged:
        (staged.temp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staged.temp / ADAPTER_WEIGHTS[0]))
    return directory
