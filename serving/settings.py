"""Settings of one served model, parsed from string parameters (Triton's config.pbtxt, CLI flags).

One table, :data:`SETTINGS`, read by parsing, by ``hotswap watch``'s flags and by the README's
configuration table (:func:`markdown_table`). Each row (:class:`Setting`) knows its kind, default,
choices and bounds and turns a raw string into a typed value; the few rules joining several
settings are :data:`RULES`. :class:`ServingSettings` has one field per row (a test keeps them
equal). Pure: :func:`parse_settings` returns :class:`ServingSettings` or raises one
:class:`~serving.errors.ConfigError` listing every bad parameter at once.

At the bottom of the import graph: importing this module loads neither torch nor an engine. The
choices and bounds come from :mod:`serving.choices`, which the modules implementing them share.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from serving.choices import (
    CANARY_MODES,
    CAST_MODES,
    DEBOUNCE_BOUNDS,
    DTYPE_NAMES,
    ENGINE_CHOICES,
    FLOAT_DTYPES,
    POLL_INTERVAL_BOUNDS,
    READ_BYTES,
    READ_BYTES_BOUNDS,
    READER_THREADS,
    READER_THREADS_BOUNDS,
    STRATEGIES,
    TASK_BYTES,
    TASK_BYTES_BOUNDS,
    TRANSFER,
    TRANSFERS,
    UNEXPECTED_MODES,
    WATCH_MODES,
    Bounds,
    dtype_key,
)
from serving.errors import ConfigError

Kind = Literal["str", "int", "float", "bool", "choice", "json", "path", "dtype", "list"]

#: the annotation of a :class:`ServingSettings` field holding a value of each kind
FIELD_TYPES: Mapping[str, str] = MappingProxyType({
    "str": "str", "int": "int", "float": "float", "bool": "bool", "choice": "str",
    "json": "tuple[tuple[str, object], ...]", "path": "Path", "dtype": "str", "list": "tuple[str, ...]",
})


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, found {raw!r}")


def _number(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(raw: str) -> int | float:
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"expected a {'whole ' if kind is int else ''}number, found {raw!r}") from None

    return parse


def _json_object(raw: str) -> tuple[tuple[str, object], ...]:
    try:
        loaded = json.loads(raw)
        if not isinstance(loaded, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ValueError(f"expected a JSON object, found {raw!r} ({e})") from e
    return tuple(sorted(loaded.items()))


def _dtype(raw: str) -> str:
    key = dtype_key(raw)
    if key is None:
        raise ValueError(f"unknown dtype {raw!r}; expected one of {sorted(DTYPE_NAMES)}")
    if key not in FLOAT_DTYPES:
        raise ValueError(f"must be a floating dtype, found {raw!r}")
    return key


#: kind -> raw string to typed value (``ValueError`` saying what was expected and found); choices are
#: checked by :meth:`Setting.parse`
_PARSERS: Mapping[str, Callable[[str], Any]] = MappingProxyType({
    "str": str, "choice": str, "bool": _bool, "int": _number(int), "float": _number(float),
    "json": _json_object, "path": lambda raw: Path(raw).expanduser(), "dtype": _dtype,
    "list": lambda raw: tuple(x.strip() for x in raw.split(",") if x.strip()),
})


@dataclass(frozen=True)
class Setting:
    """One parameter of a served model: its kind, default, allowed values and doc; it parses itself.

    ``default`` is written as in ``config.pbtxt``; ``None`` means required (``missing`` says what to
    do), or computed from other settings as ``default_doc`` says (:func:`computed_defaults`).
    ``blank_is_default``: an empty value means the default, as for an unset ``${VAR:-}``.
    ``check`` is a rule of the row beyond its kind and bounds: the problem with a typed value, or None.
    ``flag`` is its ``hotswap watch`` option (None: not one). ``engine`` names the engine an
    engine-specific option is for: its value goes to the build as written (``BuildSpec.options``)
    and that engine parses it (TensorRT: ``serving.engines.tensorrt.options``).
    """

    name: str
    kind: Kind
    doc: str
    default: str | None = None
    default_doc: str = ""
    choices: tuple[str, ...] = ()
    bounds: Bounds | None = None
    check: Callable[[Any], str | None] | None = None
    missing: str = "required"
    blank_is_default: bool = False
    flag: str | None = None
    engine: str | None = None

    @property
    def minimum(self) -> int | float | None:
        return self.bounds.minimum if self.bounds is not None else None

    def default_text(self) -> str:
        if self.default_doc:
            return self.default_doc
        return "required" if self.default is None else f"`{self.default}`"

    def parse(self, raw: str, errors: list[str]) -> Any:
        """The typed value of ``raw``; None, with each problem appended to ``errors``, if it is invalid."""
        try:
            value = _PARSERS[self.kind](raw)
        except ValueError as e:
            errors.append(f"{self.name}: {e}")
            return None
        if self.choices and value not in self.choices:
            errors.append(f"{self.name}: expected one of {', '.join(self.choices)}; found {raw!r}")
            return None
        problems = [f"{p}, found {raw!r}" for p in (self.bounds.problems(value) if self.bounds else [])]
        problem = self.check(value) if self.check is not None else None
        problems += [problem] if problem else []
        errors += [f"{self.name}: {p}" for p in problems]
        return None if problems else value


def _factory_form(value: str) -> str | None:
    return None if ":" in value else f"required, of the form 'package.module:function' (found {value!r})"


def _absolute(path: Path) -> str | None:
    return None if path.is_absolute() else f"must be an absolute path, found {str(path)!r}"


#: TensorRT's build and refit options: ``TrtBuildOptions`` reads each field's key, kind, doc and bounds here
TENSORRT_OPTIONS: tuple[Setting, ...] = (
    Setting("trt_weights_validation", "bool", "TensorRT: TensorRT checks the weights of every refit, e.g. for "
            "NaN/Inf (Refitter.weights_validation)", "true", engine="tensorrt"),
    Setting("trt_refit_max_threads", "int", "TensorRT: threads TensorRT may use for a refit (Refitter.max_threads); "
            "0 keeps TensorRT's default", "0", bounds=Bounds(minimum=0), engine="tensorrt"),
    Setting("trt_optimization_level", "int", "TensorRT: TensorRT builder optimization level (Torch-TensorRT "
            "optimization_level); unset keeps its default", None, "TensorRT's own", engine="tensorrt"),
    Setting("trt_workspace_size", "int", "TensorRT: TensorRT builder workspace in bytes (Torch-TensorRT "
            "workspace_size); 0 keeps its default", "0", engine="tensorrt"),
    Setting("trt_verify_seed", "int", "TensorRT: seed of the random weight set the build checks the weight map "
            "against", "0", engine="tensorrt"),
)

#: every parameter, in the order the README lists them (``python -m serving.settings`` renders the table)
SETTINGS: tuple[Setting, ...] = (
    Setting("model_factory", "str", "`package.module:function` returning the torch.nn.Module to serve "
            "(a module next to `model.py` is importable)", check=_factory_form,
            missing="required, of the form 'package.module:function'", flag="--factory"),
    Setting("factory_kwargs", "json", "JSON object of keyword arguments for the factory", "{}",
            blank_is_default=True, flag="--kwargs"),
    Setting("engine", "choice", "the engine the model runs on: `eager`, `aoti`, `inductor` or `tensorrt` (see How "
            "it works); `auto` is `aoti` on CPU and, on a GPU instance, `tensorrt` when TensorRT works there, "
            "otherwise `inductor` (the log says which and why)", "auto", choices=ENGINE_CHOICES,
            blank_is_default=True, flag="--engine"),
    Setting("cuda_graphs", "bool", "`true` to replay the `inductor` engine through CUDA graphs, one per batch "
            "bucket and weight slot (GPU instances)", "false"),
    Setting("weights_dir", "path", "the watched folder; must be outside the model repository (Triton's own change "
            "detection would reload the model)", None, "`$HOTSWAP_WEIGHTS_ROOT/<model name>`", check=_absolute,
            missing="not set, and neither is $HOTSWAP_WEIGHTS_ROOT; set the parameter to the folder where new "
                    "weights are dropped", flag="--folder"),
    Setting("engine_cache_dir", "path", "stripped-engine cache", None,
            "`$HOTSWAP_CACHE_DIR` or `~/.cache/hotswap/engines`", blank_is_default=True, flag="--cache-dir"),
    Setting("engine_cache_max_bytes", "int", "cache size before least-recently-used entries are evicted",
            str(8 << 30), "8 GiB", bounds=Bounds(minimum=1)),
    Setting("refit_strategy", "choice", "`double_buffer`: refit a standby copy, then switch; `in_place`: one copy, "
            "requests wait during the refit (models too large for two copies)", "double_buffer",
            choices=STRATEGIES, flag="--strategy"),
    Setting("weights_transfer", "choice", "how checkpoint bytes reach the weights: `auto` (KvikIO on a GPU when it "
            "imports and reads, otherwise the pinned ring; the log says which, why, and whether GPUDirect Storage is "
            "used), `kvikio` (KvikIO by name; refused with the fix when it cannot read here), `pinned` (our ring of "
            "pinned buffers); measurements in [docs/benchmarks.md](docs/benchmarks.md)", TRANSFER,
            choices=TRANSFERS),
    Setting("weights_reader_threads", "int", "threads reading checkpoint files: KvikIO's thread pool or the pinned "
            "ring's threads", str(READER_THREADS), bounds=READER_THREADS_BOUNDS),
    Setting("weights_read_bytes", "int", "bytes per read call of the pinned ring's threads (a multiple of 64)",
            str(READ_BYTES), "16 MiB", bounds=READ_BYTES_BOUNDS),
    Setting("weights_task_bytes", "int", "bytes per KvikIO task (a multiple of 4096)", str(TASK_BYTES), "4 MiB",
            bounds=TASK_BYTES_BOUNDS),
    Setting("dtype", "dtype", "floating dtype of the engine: `float32`, `float16`, `bfloat16`", "float32",
            flag="--dtype"),
    Setting("canary", "choice", "`off`, `finite` (outputs finite, not all zero) or `reference` (also equal to the "
            "eager model within tolerance)", None, "`reference` for compiled engines, `finite` for eager",
            choices=CANARY_MODES, blank_is_default=True, flag="--canary"),
    Setting("canary_atol", "float", "absolute tolerance of the reference canary", "1e-3", bounds=Bounds(minimum=0)),
    Setting("canary_rtol", "float", "relative tolerance of the reference canary", "1e-3", bounds=Bounds(minimum=0)),
    Setting("max_file_bytes", "int", "largest checkpoint accepted, in bytes", str(64 << 30), "64 GiB",
            bounds=Bounds(minimum=1), flag="--max-file-bytes"),
    Setting("allow_pickle", "bool", "`true` to accept PyTorch `.pt/.pth/.bin` files, loaded with "
            "`weights_only=True`", "false", flag="--allow-pickle"),
    Setting("unexpected_tensors", "choice", "`error`, or `ignore` tensors the model does not have", "error",
            choices=UNEXPECTED_MODES),
    Setting("strip_prefix", "list", "prefixes removed from every checkpoint tensor name, comma-separated, for "
            "checkpoints saved from a wrapper: `module.` (DistributedDataParallel), `model.` (Lightning), "
            "`_orig_mod.` (torch.compile)", "", "none", flag="--strip-prefix"),
    Setting("dtype_cast", "choice", "`same_kind` (floating tensors are cast to the engine dtype) or `strict` "
            "(see casting rules)", "same_kind", choices=CAST_MODES),
    Setting("watch_mode", "choice", "`inotify`, or `polling` for NFS and volumes without inotify", "inotify",
            choices=WATCH_MODES, flag="--mode"),
    Setting("poll_interval_s", "float", "polling interval in seconds", "1.0", bounds=POLL_INTERVAL_BOUNDS,
            flag="--poll-interval"),
    Setting("debounce_s", "float", "quiet time before a file written in place (not renamed in) is considered",
            "0.2", bounds=DEBOUNCE_BOUNDS, flag="--debounce"),
    Setting("lora_scale", "float", "extra multiplier on LoRA adapters' alpha/r scale (0 ignores adapters)", "1.0",
            bounds=Bounds(minimum=0), flag="--lora-scale"),
    *TENSORRT_OPTIONS,
)

#: parameter name -> its setting
BY_NAME: Mapping[str, Setting] = MappingProxyType({s.name: s for s in SETTINGS})
#: parameter name -> one line of documentation
PARAMETERS: Mapping[str, str] = MappingProxyType({s.name: s.doc for s in SETTINGS})
ENGINE_OPTION_NAMES = frozenset(s.name for s in SETTINGS if s.engine is not None)


def markdown_table() -> str:
    """The README's configuration table (a test keeps the README equal to it)."""
    rows = ["| parameter | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.default_text()} | {s.doc} |" for s in SETTINGS]
    return "\n".join(rows)


@dataclass(frozen=True)
class ServingSettings:
    """Everything the service needs besides the input/output specs: the model's name and device, then one
    field per row of :data:`SETTINGS` in its order and of its kind's type (:data:`FIELD_TYPES`), then the
    engine options that were set."""

    model_name: str
    device: str
    model_factory: str
    factory_kwargs: tuple[tuple[str, object], ...]
    engine: str
    cuda_graphs: bool
    weights_dir: Path
    engine_cache_dir: Path
    engine_cache_max_bytes: int
    refit_strategy: str
    weights_transfer: str
    weights_reader_threads: int
    weights_read_bytes: int
    weights_task_bytes: int
    #: a floating dtype's name (``serving.specs.dtype_from_name`` gives the torch dtype)
    dtype: str
    canary: str
    canary_atol: float
    canary_rtol: float
    max_file_bytes: int
    allow_pickle: bool
    unexpected_tensors: str
    #: prefixes removed from checkpoint names (``ValidationPolicy.strip_prefix``)
    strip_prefix: tuple[str, ...]
    dtype_cast: str
    watch_mode: str
    poll_interval_s: float
    debounce_s: float
    lora_scale: float
    #: engine-specific options that were set (name, value as written), for ``BuildSpec.options``
    engine_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Context:
    """What the settings of one model instance are checked against besides each other."""

    model_name: str
    device: str
    model_repository: Path | None


def _cuda_graphs_engine(v: Mapping[str, Any], ctx: Context) -> str | None:
    if v.get("cuda_graphs") and v.get("engine") not in (None, "inductor"):
        return f"cuda_graphs: applies to engine 'inductor' only (engine is {v['engine']!r})"
    return None


def _cuda_graphs_device(v: Mapping[str, Any], ctx: Context) -> str | None:
    if v.get("cuda_graphs") and not ctx.device.startswith("cuda"):
        return f"cuda_graphs: needs a GPU instance (KIND_GPU); this instance runs on {ctx.device!r}"
    return None


def _weights_outside_repository(v: Mapping[str, Any], ctx: Context) -> str | None:
    weights_dir: Path | None = v.get("weights_dir")
    if ctx.model_repository is None or weights_dir is None:
        return None
    repo = Path(ctx.model_repository).resolve()
    wd = weights_dir.resolve()
    if wd == repo or repo in wd.parents:
        return (f"weights_dir {str(weights_dir)!r} is inside the model repository {str(repo)!r}: Triton's own change "
                "detection would reload the model on every drop; move it outside the repository")
    return None


#: rules joining several settings (or a setting and the instance): each returns the problem, or None
RULES: tuple[Callable[[Mapping[str, Any], Context], str | None], ...] = (
    _cuda_graphs_engine, _cuda_graphs_device, _weights_outside_repository,
)

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


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


def computed_defaults(params: Mapping[str, str], env: Mapping[str, str], model_name: str) -> dict[str, str]:
    """The defaults that depend on other settings or the environment (the table's ``default_doc`` says which)."""
    engine = params.get("engine") or "auto"
    out = {"canary": "finite" if engine == "eager" else "reference",
           "engine_cache_dir": env.get("HOTSWAP_CACHE_DIR") or "~/.cache/hotswap/engines"}
    if "HOTSWAP_WEIGHTS_ROOT" in env:
        out["weights_dir"] = str(Path(env["HOTSWAP_WEIGHTS_ROOT"]) / model_name)
    return out


def parse_settings(
    params: Mapping[str, str],
    *,
    model_name: str,
    device: str = "cpu",
    model_repository: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServingSettings:
    """Validate string parameters by :data:`SETTINGS` and :data:`RULES`; one ConfigError names every problem."""
    env = dict(os.environ if env is None else env)
    errors: list[str] = []
    unknown = sorted(set(params) - set(BY_NAME))
    if unknown:
        errors.append(f"unknown parameter(s) {unknown}; known: {sorted(BY_NAME)}")
    p = {k: _expand(v, env, errors, k) for k, v in params.items()}
    defaults = computed_defaults(p, env, model_name)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.engine is not None:
            continue  # passed to the build as written (engine_options below)
        raw = p.get(s.name)
        if raw is None or (raw == "" and s.blank_is_default):
            raw = defaults.get(s.name, s.default)
        if raw is None:
            errors.append(f"{s.name}: {s.missing}")
        values[s.name] = None if raw is None else s.parse(raw, errors)
    context = Context(model_name, device, model_repository)
    errors += [problem for rule in RULES if (problem := rule(values, context))]
    if errors:
        raise ConfigError(f"model {model_name!r}: invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))
    return ServingSettings(model_name=model_name, device=device, **values,
                           engine_options=tuple(sorted((k, p[k]) for k in ENGINE_OPTION_NAMES if k in p)))


def main() -> None:
    """``python -m serving.settings``: print the README's configuration table."""
    print(markdown_table())


if __name__ == "__main__":
    main()
