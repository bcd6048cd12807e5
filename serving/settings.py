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

import torch

from serving.errors import ConfigError
from serving.specs import dtype_from_name

#: parameter name -> one line of documentation (the README's table is generated from this)
PARAMETERS: dict[str, str] = {
    "model_factory": "required: `package.module:function` returning the torch.nn.Module to serve",
    "factory_kwargs": "JSON object of keyword arguments for the factory (default `{}`)",
    "engine": "`eager`, `aoti` or `tensorrt`; default `tensorrt` on a GPU instance, `aoti` on CPU",
    "weights_dir": "the watched folder; default `$HOTSWAP_WEIGHTS_ROOT/<model name>`; "
                   "must be outside the model repository",
    "engine_cache_dir": "stripped-engine cache; default `$HOTSWAP_CACHE_DIR` or `~/.cache/hotswap/engines`",
    "engine_cache_max_bytes": "cache size before least-recently-used entries are evicted (default 8 GiB)",
    "refit_strategy": "`double_buffer` (default: refit a standby copy, then switch) or `in_place` "
                      "(one copy, requests wait during the refit; for models too large for two)",
    "dtype": "floating dtype of the engine: `float32` (default), `float16`, `bfloat16`",
    "canary": "`off`, `finite` (outputs finite, not all zero) or `reference` (also equal to the eager "
              "model within tolerance); default `reference` for compiled engines, `finite` for eager",
    "canary_atol": "absolute tolerance of the reference canary (default 1e-3)",
    "canary_rtol": "relative tolerance of the reference canary (default 1e-3)",
    "max_file_bytes": "largest checkpoint accepted, in bytes (default 64 GiB)",
    "allow_pickle": "`true` to accept PyTorch `.pt/.pth/.bin` files, loaded with weights_only=True "
                    "(default `false`)",
    "unexpected_tensors": "`error` (default) or `ignore`: tensors the model does not have",
    "dtype_cast": "`same_kind` (default: floating tensors are cast to the engine dtype) or `strict`",
    "watch_mode": "`inotify` (default) or `polling` (NFS and volumes without inotify)",
    "poll_interval_s": "polling interval in seconds (default 1.0)",
    "debounce_s": "quiet time before a changed path is considered (default 0.2)",
    "lora_scale": "extra multiplier on LoRA adapters' alpha/r scale (default 1.0)",
}

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


@dataclass(frozen=True)
class ServingSettings:
    """Everything the service needs besides the input/output specs."""

    model_name: str
    model_factory: str
    factory_kwargs: tuple[tuple[str, object], ...]
    engine: str
    device: str
    weights_dir: Path
    engine_cache_dir: Path
    engine_cache_max_bytes: int
    refit_strategy: str
    dtype: torch.dtype
    canary: str
    canary_atol: float
    canary_rtol: float
    max_file_bytes: int
    allow_pickle: bool
    unexpected_tensors: str
    dtype_cast: str
    watch_mode: str
    poll_interval_s: float
    debounce_s: float
    lora_scale: float


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


def _num(value: str, key: str, errors: list[str], kind: type = float, minimum: float = 0.0) -> float:
    try:
        n = kind(value)
    except ValueError:
        errors.append(f"{key}: expected a {'whole ' if kind is int else ''}number, found {value!r}")
        return 0
    if n < minimum:
        errors.append(f"{key}: must be >= {minimum}, found {value!r}")
    return n  # type: ignore[no-any-return]


def _choice(value: str, key: str, choices: tuple[str, ...], errors: list[str]) -> str:
    if value not in choices:
        errors.append(f"{key}: expected one of {', '.join(choices)}; found {value!r}")
    return value


def parse_settings(
    params: Mapping[str, str],
    *,
    model_name: str,
    device: str = "cpu",
    model_repository: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServingSettings:
    """Validate string parameters; one ConfigError names every problem."""
    import json

    env = dict(os.environ if env is None else env)
    errors: list[str] = []
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        errors.append(f"unknown parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
    p = {k: _expand(v, env, errors, k) for k, v in params.items()}

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

    is_gpu = device.startswith("cuda")
    engine = _choice(p.get("engine") or ("tensorrt" if is_gpu else "aoti"), "engine",
                     ("eager", "aoti", "tensorrt"), errors)

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

    settings = ServingSettings(
        model_name=model_name,
        model_factory=factory,
        factory_kwargs=tuple(sorted(kwargs.items())),
        engine=engine,
        device=device,
        weights_dir=weights_dir,
        engine_cache_dir=Path(p.get("engine_cache_dir") or cache_default).expanduser(),
        engine_cache_max_bytes=int(_num(p.get("engine_cache_max_bytes", str(8 << 30)),
                                        "engine_cache_max_bytes", errors, int, 1)),
        refit_strategy=_choice(p.get("refit_strategy", "double_buffer"), "refit_strategy",
                               ("double_buffer", "in_place"), errors),
        dtype=dtype,
        canary=_choice(p.get("canary") or ("finite" if engine == "eager" else "reference"), "canary",
                       ("off", "finite", "reference"), errors),
        canary_atol=_num(p.get("canary_atol", "1e-3"), "canary_atol", errors),
        canary_rtol=_num(p.get("canary_rtol", "1e-3"), "canary_rtol", errors),
        max_file_bytes=int(_num(p.get("max_file_bytes", str(64 << 30)), "max_file_bytes", errors, int, 1)),
        allow_pickle=_bool(p.get("allow_pickle", "false"), "allow_pickle", errors),
        unexpected_tensors=_choice(p.get("unexpected_tensors", "error"), "unexpected_tensors",
                                   ("error", "ignore"), errors),
        dtype_cast=_choice(p.get("dtype_cast", "same_kind"), "dtype_cast", ("same_kind", "strict"), errors),
        watch_mode=_choice(p.get("watch_mode", "inotify"), "watch_mode", ("inotify", "polling"), errors),
        poll_interval_s=_num(p.get("poll_interval_s", "1.0"), "poll_interval_s", errors, float, 0.01),
        debounce_s=_num(p.get("debounce_s", "0.2"), "debounce_s", errors),
        lora_scale=_num(p.get("lora_scale", "1.0"), "lora_scale", errors),
    )
    if errors:
        raise ConfigError(f"model {model_name!r}: invalid configuration:\n"
                          + "\n".join(f"  - {e}" for e in errors))
    return settings
