"""LoRA adapters in PEFT format: parse them, check them against the base weights, merge them.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. Keys
are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear and Conv2d; an adapter
name may follow ``lora_A``, as in ``.lora_A.default.weight``) and
``base_model.model.<module>.lora_embedding_A`` / ``_B`` (Embedding). Other keys naming a base weight
(``bias="all"``/``"lora_only"`` biases, ``modules_to_save``) replace that weight whole.

Merging follows PEFT's ``merge()``: ``W = W0 + s * B @ A`` with ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` per module from
``rank_pattern`` / ``alpha_pattern`` (first key ``k`` in order with ``re.match(rf"(.*\\.)?({k})$",
module)``), else the defaults. The delta is transposed for base weights stored ``[in, out]``
(``fan_in_fan_out``, GPT-2's Conv1D) and for embeddings; a Conv2d delta is ``B[:, :, 0, 0] @ A``
over the flattened kernel. Where the layout can be read from the shapes (a non-square weight) the
shapes decide, as PEFT decides by the layer type; a square weight follows ``fan_in_fan_out``.

Pure functions apart from :func:`read_adapter` (reads a directory) and :func:`save_adapter`
(writes one, atomically). Merges always start from the given base tensors, never from a previous
merge, and only the touched tensors are new objects in the result.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.errors import CheckpointError, ValidationError, reading
from serving.specs import WeightSpec, dtype_name
from serving.weights.checkpoint import CheckpointPolicy, describe_checkpoint, detect_checkpoint, read_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 1 << 20

_LINEAR_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_UNSUPPORTED_PARTS = ("lora_magnitude_vector", "lora_E", "lora_T")


def _invalid(source: str, problems: Sequence[str]) -> ValidationError:
    return ValidationError(source, problems, reason="lora_invalid")


# ---------------------------------------------------------------- config


def _pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module name."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that decide the merge."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, object], source: str) -> LoraConfig:
        """Validate a parsed ``adapter_config.json``; one error lists every problem."""
        problems: list[str] = []
        peft_type = d.get("peft_type")
        if peft_type not in (None, "LORA", "lora"):
            problems.append(f"peft_type {peft_type!r}: only LORA adapters can be merged")
        for flag in ("use_dora", "lora_bias", "use_qalora"):
            if d.get(flag):
                problems.append(f"{flag}=true is not supported: only plain LoRA (A, B, alpha) is merged")
        if d.get("layer_replication"):
            problems.append("layer_replication is not supported (it changes the model's structure)")

        def integer(key: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{key} must be a positive integer, found {value!r}")
                return 1
            return value

        def number(key: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{key} must be a finite number, found {value!r}")
                return 1.0
            return float(value)

        def modules(key: str) -> tuple[str, ...] | str | None:
            value = d.get(key)
            if value is None or value == []:
                return None
            if isinstance(value, str):
                if value == "all-linear":
                    return None  # every Linear: the weights name the modules
                try:
                    re.compile(value)
                except re.error as e:
                    problems.append(f"{key} {value!r} is not a valid regular expression: {e}")
                return value
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            problems.append(f"{key} must be a list of module names or a regex string, found {value!r}")
            return None

        def pattern(key: str, conv: type) -> tuple[tuple[str, object], ...]:
            value = d.get(key) or {}
            if not isinstance(value, dict):
                problems.append(f"{key} must be an object {{module pattern: value}}, found {value!r}")
                return ()
            out = []
            for k, v in value.items():
                try:
                    re.compile(k)
                except re.error as e:
                    problems.append(f"{key} key {k!r} is not a valid regular expression: {e}")
                    continue
                out.append((k, integer(f"{key}[{k!r}]", v) if conv is int else number(f"{key}[{k!r}]", v)))
            return tuple(out)

        r = integer("r", d.get("r", 8))
        alpha = number("lora_alpha", d.get("lora_alpha", 8))
        config = cls(
            r=r,
            lora_alpha=alpha,
            target_modules=modules("target_modules"),
            exclude_modules=modules("exclude_modules"),
            use_rslora=bool(d.get("use_rslora") or False),
            fan_in_fan_out=bool(d.get("fan_in_fan_out") or False),
            rank_pattern=pattern("rank_pattern", int),  # type: ignore[arg-type]
            alpha_pattern=pattern("alpha_pattern", float),  # type: ignore[arg-type]
        )
        if problems:
            raise _invalid(f"{source}/{ADAPTER_CONFIG}", problems)
        return config

    def rank_for(self, module: str) -> int:
        key = _pattern_key([k for k, _ in self.rank_pattern], module)
        return dict(self.rank_pattern)[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key([k for k, _ in self.alpha_pattern], module)
        return dict(self.alpha_pattern)[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for this module."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists``: regex full match, or exact/suffix name match."""

        def match(spec: tuple[str, ...] | str) -> bool:
            if isinstance(spec, str):
                return re.fullmatch(spec, module) is not None
            return module in spec or any(module.endswith("." + t) for t in spec)

        if self.exclude_modules is not None and match(self.exclude_modules):
            return False
        return self.target_modules is None or match(self.target_modules)


# ---------------------------------------------------------------- adapter


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``W = W0 + scale * delta(A, B)``."""

    module: str
    #: the base weight it changes (``<module>.weight``)
    weight: str
    kind: str  # "linear" | "embedding" | "conv"
    a: torch.Tensor
    b: torch.Tensor
    rank: int
    #: alpha / r (or alpha / sqrt(r)), without the server's extra lora_scale
    scale: float
    #: the base weight is stored [in, out] (fan_in_fan_out / Conv1D)
    transposed: bool = False


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter, ready to merge into base tensors of the engine's specs."""

    name: str
    config: LoraConfig
    modules: tuple[LoraModule, ...]
    #: full tensors the adapter replaces (trained biases, modules_to_save)
    replaced: Mapping[str, torch.Tensor]
    source: str = ""

    @property
    def touched(self) -> frozenset[str]:
        """Base weight names the merge changes."""
        return frozenset([m.weight for m in self.modules] + list(self.replaced))


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def build_adapter(config: LoraConfig, tensors: Mapping[str, torch.Tensor], specs: Mapping[str, WeightSpec],
                  *, source: str, name: str) -> LoraAdapter:
    """Check an adapter's tensors against the base weight specs; every problem names the module.

    Raises :class:`ValidationError` with ``reason="lora_mismatch"`` when targets or shapes do not fit
    the base, ``reason="lora_invalid"`` when the adapter itself is malformed (unpaired A/B, several
    adapter names, NaN/Inf, ranks that disagree with the config).
    """
    invalid: list[str] = []
    mismatch: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    replaced: dict[str, torch.Tensor] = {}
    adapter_names: set[str] = set()
    for key, t in tensors.items():
        k = _strip(key)
        m = _LINEAR_KEY.match(k) or _EMBED_KEY.match(k)
        if m is not None:
            module, part = m.group("module"), m.group("part")
            if m.groupdict().get("param") == "bias":
                invalid.append(f"module {module!r}: {key!r} is a LoRA bias (lora_bias=true), which is not supported")
                continue
            if m.group("adapter"):
                adapter_names.add(m.group("adapter"))
            kind = "embedding" if part.startswith("lora_embedding") else "low_rank"
            if kinds.setdefault(module, kind) != kind:
                invalid.append(f"module {module!r}: mixes lora_A/B and lora_embedding_A/B tensors")
                continue
            side = part[-1]  # "A" | "B"
            if side in parts.setdefault(module, {}):
                invalid.append(f"module {module!r}: several lora_{side} tensors (several adapter names?)")
                continue
            parts[module][side] = t
        elif any(f".{p}" in f".{k}" for p in _UNSUPPORTED_PARTS):
            invalid.append(f"{key!r}: DoRA/AdaLoRA tensors are not supported; merge only plain LoRA adapters")
        elif k in specs:
            spec = specs[k]
            if _shape(t) != spec.shape:
                mismatch.append(f"{key!r}: replaces base weight {k!r} of shape {spec.shape}, "
                                f"but has shape {_shape(t)}")
            elif t.is_floating_point() != spec.dtype.is_floating_point or (
                    not t.is_floating_point() and t.dtype != spec.dtype):
                mismatch.append(f"{key!r}: dtype {dtype_name(t.dtype)}, base weight {k!r} is "
                                f"{dtype_name(spec.dtype)}")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                invalid.append(f"{key!r}: holds NaN/Inf values")
            else:
                replaced[k] = t
        else:
            mismatch.append(f"{key!r}: neither a LoRA tensor nor a weight of the base model (no {k!r} in it)")
    if len(adapter_names) > 1:
        invalid.append(f"tensors of several adapters ({sorted(adapter_names)}); save one adapter per directory")

    modules: list[LoraModule] = []
    for module in sorted(parts):
        got = parts[module]
        if set(got) != {"A", "B"}:
            lacking = "lora_B" if "A" in got else "lora_A"
            invalid.append(f"module {module!r}: {lacking} is missing (A and B come in pairs)")
            continue
        a, b = got["A"], got["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            invalid.append(f"module {module!r}: A/B must be floating point, found "
                           f"{dtype_name(a.dtype)}/{dtype_name(b.dtype)}")
            continue
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            invalid.append(f"module {module!r}: lora_A or lora_B holds NaN/Inf values")
            continue
        if not config.targets(module):
            mismatch.append(f"module {module!r}: has LoRA weights but adapter_config.json's target_modules "
                            f"{config.target_modules!r} (exclude_modules {config.exclude_modules!r}) do not "
                            f"select it")
            continue
        weight = f"{module}.weight"
        wspec = specs.get(weight)
        if wspec is None:
            near = sorted(n for n in specs if n.endswith(f".{module.rsplit('.', 1)[-1]}.weight"))[:3]
            hint = f"; the base has {near}" if near else ""
            mismatch.append(f"module {module!r}: the base model has no weight {weight!r} (adapter made for "
                            f"another model, or a different module naming?){hint}")
            continue
        problem, kind, transposed = _check_shapes(module, kinds[module], a, b, wspec, config.fan_in_fan_out)
        if problem:
            mismatch.append(problem)
            continue
        rank = int(a.shape[0])
        want = config.rank_for(module)
        if want != rank:
            invalid.append(f"module {module!r}: tensors have rank {rank}, adapter_config.json says r={want} "
                           f"(r / rank_pattern); the scale alpha/r would be wrong")
            continue
        if not wspec.dtype.is_floating_point:
            mismatch.append(f"module {module!r}: base weight {weight!r} is {dtype_name(wspec.dtype)}, not floating")
            continue
        modules.append(LoraModule(module, weight, kind, a, b, rank, config.scale_for(module), transposed))
    both = sorted(set(replaced) & {m.weight for m in modules})
    if both:
        invalid.append(f"weights {both} are both replaced whole and LoRA-adapted")
    if not modules and not replaced and not invalid and not mismatch:
        invalid.append("no LoRA tensors (lora_A/lora_B) in adapter_model")
    if invalid:
        raise _invalid(source, invalid + mismatch)
    if mismatch:
        raise ValidationError(source, mismatch, reason="lora_mismatch")
    return LoraAdapter(name, config, tuple(modules), replaced, source)


def _check_shapes(module: str, kind: str, a: torch.Tensor, b: torch.Tensor, spec: WeightSpec,
                  fan_in_fan_out: bool) -> tuple[str | None, str, bool]:
    """``(problem or None, kind, transposed)``; the problem names the module, expected and found shapes."""
    w = spec.shape
    sa, sb = _shape(a), _shape(b)
    where = f"module {module!r}: lora_A {sa}, lora_B {sb} vs base weight {spec.name!r} {w}"
    if kind == "embedding":
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            return f"{where}: lora_embedding_A must be [r, num_embeddings], lora_embedding_B [dim, r]", kind, False
        if w != (sa[1], sb[0]):
            return f"{where}: expected an embedding of shape {(sa[1], sb[0])}", kind, False
        return None, kind, False
    if len(sa) == 4:
        if len(sb) != 4 or sb[2:] != (1, 1) or sa[0] != sb[1]:
            return f"{where}: a Conv2d adapter needs lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1]", "conv", False
        if w != (sb[0], sa[1], sa[2], sa[3]):
            return f"{where}: expected a conv weight of shape {(sb[0], sa[1], sa[2], sa[3])}", "conv", False
        return None, "conv", False
    if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
        return f"{where}: lora_A must be [r, in_features] and lora_B [out_features, r] with the same r", kind, False
    standard, flipped = (sb[0], sa[1]), (sa[1], sb[0])
    if w == standard and w == flipped:
        return None, "linear", fan_in_fan_out
    if w == standard:
        return None, "linear", False
    if w == flipped:
        return None, "linear", True
    return f"{where}: expected {standard} (or {flipped} with fan_in_fan_out)", "linear", False


# ---------------------------------------------------------------- merge


def lora_delta(m: LoraModule, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * B @ A`` laid out like the base weight (without the server's extra scale)."""
    a = m.a.to(device=device, dtype=dtype)
    b = m.b.to(device=device, dtype=dtype)
    if m.kind == "conv":
        d = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    else:
        d = b @ a
        if m.kind == "embedding" or m.transposed:
            d = d.T
    return d * m.scale


def merge_lora(base: Mapping[str, torch.Tensor], adapter: LoraAdapter, *, scale: float = 1.0,
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``base`` with the adapter merged at ``scale`` (times each module's alpha/r), computed on ``device``.

    Returns a new dict: the touched tensors are new (on ``device``, in the base tensors' dtypes),
    every other entry is the very tensor object of ``base``. The sum is computed in float32
    (float64 for float64 weights) and cast back once. Raises :class:`ValidationError`
    (``reason="lora_invalid"``) if a merged weight is not finite (e.g. overflows float16).
    """
    out = dict(base)
    problems: list[str] = []
    for m in adapter.modules:
        w0 = base[m.weight]
        dev = device if device is not None else w0.device
        compute = torch.float64 if w0.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            merged = w0.to(device=dev, dtype=compute) + lora_delta(m, device=dev, dtype=compute) * scale
            w = merged.to(w0.dtype)
        if not bool(torch.isfinite(w).all()):
            problems.append(f"module {m.module!r}: merged weight {m.weight!r} has NaN/Inf values "
                            f"(adapter too large for {dtype_name(w0.dtype)}?)")
        out[m.weight] = w
    for name, t in adapter.replaced.items():
        w0 = base[name]
        dev = device if device is not None else w0.device
        out[name] = t.to(device=dev, dtype=w0.dtype if t.is_floating_point() else t.dtype).clone()
    if problems:
        raise _invalid(adapter.source or adapter.name, problems)
    return out


# ---------------------------------------------------------------- files


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
