"""Settings of one served model, parsed from string parameters (Triton's config.pbtxt, CLI flags).

Pure: :func:`parse_settings` takes plain strings and returns :class:`ServingSettings` or raises
one :class:`~serving.errors.ConfigError` listing every bad parameter at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from serving.choices import (
    CANARY_MODES,
    CAST_MODES,
    ENGINE_CHOICES,
    READ_BYTES,
    READER_THREADS,
    STRATEGIES,
    TRANSFERS,
    UNEXPECTED_MODES,
    WATCH_MODES,
)
from serving.errors import ConfigError
from serving.specs import dtype_from_name


@dataclass(frozen=True)
class Setting:
    """One parameter of a served model: how it is parsed, its default, its allowed values, its doc.

    ``default`` is written as in ``config.pbtxt``; ``None`` means required, or computed from other
    settings as ``default_doc`` says. ``flag`` is its ``hotswap watch`` option (None: not one).
    """

    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "choice" | "json" | "path" | "dtype"
    doc: str
    default: str | None = None
    default_doc: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    flag: str | None = None

    def default_text(self) -> str:
        if self.default_doc:
            return self.default_doc
        return "required" if self.default is None else f"`{self.default}`"


def _engine_options() -> tuple[Setting, ...]:
    """Engine-specific options, from the engines' own option tables (passed to the build as ``BuildSpec.options``)."""
    from serving.engines.tensorrt.options import OPTIONS as TRT

    return tuple(Setting(o.key, o.kind, f"TensorRT: {o.doc}", None if o.default is None else str(o.default).lower(),
                         "" if o.default is not None else "TensorRT's own", minimum=o.minimum) for o in TRT)


#: every parameter, in the order the README lists them (``python -m serving.settings`` renders the table)
SETTINGS: tuple[Setting, ...] = (
    Setting("model_factory", "str", "`package.module:function` returning the torch.nn.Module to serve "
            "(a module next to `model.py` is importable)", flag="--factory"),
    Setting("factory_kwargs", "json", "JSON object of keyword arguments for the factory", "{}", flag="--kwargs"),
    Setting("engine", "choice", "the engine the model runs on: `eager`, `aoti`, `inductor` or `tensorrt` (see How "
            "it works); `auto` is `aoti` on CPU and, on a GPU instance, `tensorrt` when TensorRT works there, "
            "otherwise `inductor` (the log says which and why)", "auto", choices=ENGINE_CHOICES, flag="--engine"),
    Setting("cuda_graphs", "bool", "`true` to replay the `inductor` engine through CUDA graphs, one per batch "
            "bucket and weight slot (GPU instances)", "false"),
    Setting("weights_dir", "path", "the watched folder; must be outside the model repository (Triton's own change "
            "detection would reload the model)", None, "`$HOTSWAP_WEIGHTS_ROOT/<model name>`", flag="--folder"),
    Setting("engine_cache_dir", "path", "stripped-engine cache", None,
            "`$HOTSWAP_CACHE_DIR` or `~/.cache/hotswap/engines`", flag="--cache-dir"),
    Setting("engine_cache_max_bytes", "int", "cache size before least-recently-used entries are evicted",
            str(8 << 30), "8 GiB", minimum=1),
    Setting("refit_strategy", "choice", "`double_buffer`: refit a standby copy, then switch; `in_place`: one copy, "
            "requests wait during the refit (models too large for two copies)", "double_buffer",
            choices=STRATEGIES, flag="--strategy"),
    Setting("weights_transfer", "choice", "how checkpoint bytes reach a GPU instance: `pinned` (through a ring of "
            "pinned buffers) or `registered` (DMA straight from the file's page cache, registered with CUDA: each byte "
            "crosses host memory once, but registering is slower than the pinned ring on the hosts measured; see "
            "Measured)", "pinned", choices=TRANSFERS),
    Setting("weights_reader_threads", "int", "threads reading checkpoint files into the pinned ring (fewer leave "
            "more CPU to requests served during a refit; see Measured)", str(READER_THREADS), minimum=1),
    Setting("weights_read_bytes", "int", "bytes per read call of those threads (a multiple of 64)",
            str(READ_BYTES), "16 MiB", minimum=4096),
    Setting("dtype", "dtype", "floating dtype of the engine: `float32`, `float16`, `bfloat16`", "float32",
            flag="--dtype"),
    Setting("canary", "choice", "`off`, `finite` (outputs finite, not all zero) or `reference` (also equal to the "
            "eager model within tolerance)", None, "`reference` for compiled engines, `finite` for eager",
            choices=CANARY_MODES, flag="--canary"),
    Setting("canary_atol", "float", "absolute tolerance of the reference canary", "1e-3", minimum=0),
    Setting("canary_rtol", "float", "relative tolerance of the reference canary", "1e-3", minimum=0),
    Setting("max_file_bytes", "int", "largest checkpoint accepted, in bytes", str(64 << 30), "64 GiB", minimum=1,
            flag="--max-file-bytes"),
    Setting("allow_pickle", "bool", "`true` to accept PyTorch `.pt/.pth/.bin` files, loaded with "
            "`weights_only=True`", "false", flag="--allow-pickle"),
    Setting("unexpected_tensors", "choice", "`error`, or `ignore` tensors the model does not have", "error",
            choices=UNEXPECTED_MODES),
    Setting("strip_prefix", "str", "prefixes removed from every checkpoint tensor name, comma-separated, for "
            "checkpoints saved from a wrapper: `module.` (DistributedDataParallel), `model.` (Lightning), "
            "`_orig_mod.` (torch.compile)", "", "none", flag="--strip-prefix"),
    Setting("dtype_cast", "choice", "`same_kind` (floating tensors are cast to the engine dtype) or `strict` "
            "(see casting rules)", "same_kind", choices=CAST_MODES),
    Setting("watch_mode", "choice", "`inotify`, or `polling` for NFS and volumes without inotify", "inotify",
            choices=WATCH_MODES, flag="--mode"),
    Setting("poll_interval_s", "float", "polling interval in seconds", "1.0", minimum=0.01, flag="--poll-interval"),
    Setting("debounce_s", "float", "quiet time before a file written in place (not renamed in) is considered",
            "0.2", minimum=0, flag="--debounce"),
    Setting("lora_scale", "float", "extra multiplier on LoRA adapters' alpha/r scale (0 ignores adapters)", "1.0",
            minimum=0, flag="--lora-scale"),
    *_engine_options(),
)

#: parameter name -> its setting
BY_NAME: Mapping[str, Setting] = MappingProxyType({s.name: s for s in SETTINGS})
#: parameter name -> one line of documentation
PARAMETERS: Mapping[str, str] = MappingProxyType({s.name: s.doc for s in SETTINGS})
ENGINE_OPTION_NAMES = frozenset(s.name for s in _engine_options())


def markdown_table() -> str:
    """The README's configuration table (a test keeps the README equal to it)."""
    rows = ["| parameter | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.default_text()} | {s.doc} |" for s in SETTINGS]
    return "\n".join(rows)


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


@dataclass(frozen=True)
class ServingSettings:
    """Everything the service needs besides the input/output specs."""

    model_name: str
    model_factory: str
    factory_kwargs: tuple[tuple[str, object], ...]
    engine: str
    cuda_graphs: bool
    device: str
    weights_dir: Path
    engine_cache_dir: Path
    engine_cache_max_bytes: int
    refit_strategy: str
    weights_transfer: str
    weights_reader_threads: int
    weights_read_bytes: int
    dtype: torch.dtype
    canary: str
    canary_atol: float
    canary_rtol: float
    max_file_bytes: int
    allow_pickle: bool
    unexpected_tensors: str
    dtype_cast: str
    #: prefixes removed from checkpoint names (``ValidationPolicy.strip_prefix``)
    strip_prefix: tuple[str, ...]
    watch_mode: str
    poll_interval_s: float
    debounce_s: float
    lora_scale: float
    #: engine-specific options that were set (name, value as written), for ``BuildSpec.options``
    engine_options: tuple[tuple[str, str], ...] = ()


def _expand(value: str, env: Mapping[str, str], errors: list[str], key: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name not in env and m.group(2) is not None:
            return m.group(2)  # ${VAR:-default}
        if name not in env:
            errors.append(f"{key}: environment variable ${name} is not set (value {value!r})")
            return m.group(0)
        return env[name]

    return _VAR.sub(sub, value)


def _bool(value: str, key: str, errors: list[str]) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    errors.append(f"{key}: expected true or false, found {value!r}")
    return False


def _num(value: str, key: str, errors: list[str], kind: type = float, minimum: float | None = None) -> float:
    try:
        n = kind(value)
    except ValueError:
        errors.append(f"{key}: expected a {'whole ' if kind is int else ''}number, found {value!r}")
        return 0
    if minimum is not None and n < minimum:
        errors.append(f"{key}: must be >= {minimum}, found {value!r}")
    return n  # type: ignore[no-any-return]


def _value(setting: Setting, raw: str, errors: list[str]) -> object:
    """One parameter's value by its kind (errors collected, not raised)."""
    key = setting.name
    if setting.kind == "bool":
        return _bool(raw, key, errors)
    if setting.kind in ("int", "float"):
        return _num(raw, key, errors, int if setting.kind == "int" else float, setting.minimum)
    if setting.kind == "choice" and raw not in setting.choices:
        errors.append(f"{key}: expected one of {', '.join(setting.choices)}; found {raw!r}")
    return raw


def parse_settings(
    params: Mapping[str, str],
    *,
    model_name: str,
    device: str = "cpu",
    model_repository: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServingSettings:
    """Validate string parameters by :data:`SETTINGS`; one ConfigError names every problem."""
    import json

    env = dict(os.environ if env is None else env)
    errors: list[str] = []
    unknown = sorted(set(params) - set(BY_NAME))
    if unknown:
        errors.append(f"unknown parameter(s) {unknown}; known: {sorted(BY_NAME)}")
    p = {k: _expand(v, env, errors, k) for k, v in params.items()}

    # computed defaults (documented in the table's default_doc)
    engine = p.get("engine") or "auto"
    computed = {"engine": engine, "canary": p.get("canary") or ("finite" if engine == "eager" else "reference")}
    values: dict[str, object] = {}
    for setting in SETTINGS:
        raw = computed.get(setting.name, p.get(setting.name, setting.default))
        if raw is not None and setting.kind in ("bool", "int", "float", "choice"):
            values[setting.name] = _value(setting, raw, errors)

    factory = p.get("model_factory", "")
    if ":" not in factory:
        errors.append("model_factory: required, of the form 'package.module:function' "
                      f"(found {factory!r})")
    kwargs: dict[str, object] = {}
    try:
        loaded = json.loads(p.get("factory_kwargs") or "{}")
        if not isinstance(loaded, dict):
            raise ValueError("not an object")
        kwargs = loaded
    except ValueError as e:
        errors.append(f"factory_kwargs: expected a JSON object, found {p.get('factory_kwargs')!r} ({e})")

    engine = str(values["engine"])
    cuda_graphs = bool(values["cuda_graphs"])
    if cuda_graphs and engine != "inductor":
        errors.append(f"cuda_graphs: applies to engine 'inductor' only (engine is {engine!r})")
    if cuda_graphs and not device.startswith("cuda"):
        errors.append(f"cuda_graphs: needs a GPU instance (KIND_GPU); this instance runs on {device!r}")

    read_bytes = values.get("weights_read_bytes")
    if isinstance(read_bytes, int) and read_bytes % 64:
        errors.append(f"weights_read_bytes: must be a multiple of 64, found {read_bytes}")

    if "weights_dir" in p:
        weights_dir = Path(p["weights_dir"]).expanduser()
    elif "HOTSWAP_WEIGHTS_ROOT" in env:
        weights_dir = Path(env["HOTSWAP_WEIGHTS_ROOT"]) / model_name
    else:
        weights_dir = Path()
        errors.append("weights_dir: not set, and neither is $HOTSWAP_WEIGHTS_ROOT; set the parameter "
                      "to the folder where new weights are dropped")
    if weights_dir != Path() and not weights_dir.is_absolute():
        errors.append(f"weights_dir: must be an absolute path, found {str(weights_dir)!r}")
    if model_repository is not None and weights_dir != Path():
        repo = Path(model_repository).resolve()
        wd = weights_dir.resolve()
        if wd == repo or repo in wd.parents:
            errors.append(
                f"weights_dir {str(weights_dir)!r} is inside the model repository {str(repo)!r}: Triton's "
                "own change detection would reload the model on every drop; move it outside the repository"
            )

    cache_default = env.get("HOTSWAP_CACHE_DIR") or str(Path("~/.cache/hotswap/engines").expanduser())
    dtype = torch.float32
    try:
        dtype = dtype_from_name(p.get("dtype", "float32"))
        if not dtype.is_floating_point:
            errors.append(f"dtype: must be a floating dtype, found {p['dtype']!r}")
    except ConfigError as e:
        errors.append(f"dtype: {e}")

    if errors:
        raise ConfigError(f"model {model_name!r}: invalid configuration:\n"
                          + "\n".join(f"  - {e}" for e in errors))
    v = values
    return ServingSettings(
        model_name=model_name,
        model_factory=factory,
        factory_kwargs=tuple(sorted(kwargs.items())),
        engine=engine,
        cuda_graphs=cuda_graphs,
        device=device,
        weights_dir=weights_dir,
        engine_cache_dir=Path(p.get("engine_cache_dir") or cache_default).expanduser(),
        engine_cache_max_bytes=int(v["engine_cache_max_bytes"]),  # type: ignore[call-overload]
        refit_strategy=str(v["refit_strategy"]),
        weights_transfer=str(v["weights_transfer"]),
        weights_reader_threads=int(v["weights_reader_threads"]),  # type: ignore[call-overload]
        weights_read_bytes=int(v["weights_read_bytes"]),  # type: ignore[call-overload]
        dtype=dtype,
        canary=str(v["canary"]),
        canary_atol=float(v["canary_atol"]),  # type: ignore[arg-type]
        canary_rtol=float(v["canary_rtol"]),  # type: ignore[arg-type]
        max_file_bytes=int(v["max_file_bytes"]),  # type: ignore[call-overload]
        allow_pickle=bool(v["allow_pickle"]),
        unexpected_tensors=str(v["unexpected_tensors"]),
        dtype_cast=str(v["dtype_cast"]),
        strip_prefix=tuple(x.strip() for x in p.get("strip_prefix", "").split(",") if x.strip()),
        watch_mode=str(v["watch_mode"]),
        poll_interval_s=float(v["poll_interval_s"]),  # type: ignore[arg-type]
        debounce_s=float(v["debounce_s"]),  # type: ignore[arg-type]
        lora_scale=float(v["lora_scale"]),  # type: ignore[arg-type]
        engine_options=tuple(sorted((k, p[k]) for k in ENGINE_OPTION_NAMES if k in p)),
    )


def main() -> None:
    """``python -m serving.settings``: print the README's configuration table."""
    print(markdown_table())


if __name__ == "__main__":
    main()
