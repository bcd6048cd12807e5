"""The weight-stripped AOTInductor engine.

The model is exported once (``torch.export`` with a dynamic batch) and compiled by AOTInductor
into a ``.pt2`` package that holds code only: ``package_constants_in_so=False`` leaves the
weights out, ``always_keep_tensor_constants=True`` stops Inductor from inlining small tensors
into the code (every 0-d tensor and every 1-D tensor of at most 8 elements, see
``GraphLowering.can_inline_constant``), which would otherwise be baked in and never refit.
The build checks both: no weight files in the package, and the compiled model's constants are
exactly the state-dict tensors the graph reads. The package goes to the stripped-engine cache;
a hit loads it without exporting or compiling.

Before the first package is loaded in a process, a child process loads it
(:mod:`serving.engines.aoti_probe`): where the loader crashes (torch 2.11+cu130 on the GPU machine),
the engine is refused with a clear error instead of a segfault.

Each slot is its own loaded runner (the package loader ``aoti_load_package`` builds), so a standby slot is refitted and
checked while the active one serves; switching slots is the coordinator's pointer switch. A slot's
constants are its own buffers, allocated once and registered once with
``load_constants(..., user_managed=True)`` (the runner points at them); a refit writes into them, and
a loader may write into them directly (:meth:`AOTISlot.buffers`), so a refit costs no copy at all.
Registering new tensors on every refit is what must not happen: in torch 2.13 the user-managed form
leaks every tensor it is given (``MaybeOwningAtenTensorHandle(handle, user_managed=true)`` in
``aoti_runtime/utils.h`` takes a new handle with ``aoti_torch_new_tensor_handle`` and its destructor
never frees it; measured: 50 refits of a 4.4 MB model passing new tensors grew the process by 219 MB).
Registered once, the buffers live as long as the slot anyway. (The copying form,
``user_managed=False``, ``memcpy``s each tensor's whole *storage*, so a view into a larger storage
overruns the blob — measured: heap corruption; :meth:`AOTISlot.refit` refuses such views.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import shutil
import tempfile
import threading
import time
import weakref
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.utils._pytree as pytree

from serving.cache import CacheEntry, EngineCache, cache_key, cache_key_fields, graph_fingerprint
from serving.engines.aoti_probe import ensure_loadable
from serving.engines.base import BuildInfo, Engine, WeightSlot, build_device, weight_problems
from serving.engines.export import EXAMPLE_BATCH, export, input_problems, make_module
from serving.errors import (
    CacheError,
    EngineBuildError,
    NotReadyError,
    RefitError,
    ValidationError,
)
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, WeightSpec, dtype_name, specs_with_ties

log = logging.getLogger(__name__)

#: Inductor settings of every build (part of the cache key)
INDUCTOR_CONFIGS: dict[str, object] = {
    # weights stay out of the .so: the package is code only, weights arrive by refit
    "aot_inductor.package_constants_in_so": False,
    # never inline small tensors (<= 8-element 1-D, 0-d) into the code: they would be baked in
    "always_keep_tensor_constants": True,
}
#: size-only settings, applied where this torch has them (torch 2.11 has no enable_line_tables)
OPTIONAL_INDUCTOR_CONFIGS: dict[str, object] = {
    # the -g1 line tables are ~70% of a small model's .so and only serve profilers
    "aot_inductor.enable_line_tables": False,
}
#: the payload file of a cache entry
PACKAGE_FILE = "model.pt2"
#: the tensors the engine keeps (non-persistent buffers, traced constants: no weights), when there are any
KEPT_FILE = "kept.safetensors"


# --------------------------------------------------------------------------- pure helpers


def inductor_configs() -> dict[str, object]:
    """:data:`INDUCTOR_CONFIGS` plus the optional settings this torch knows."""
    configs = dict(INDUCTOR_CONFIGS)
    for name, value in OPTIONAL_INDUCTOR_CONFIGS.items():
        obj: Any = torch._inductor.config
        *parents, leaf = name.split(".")
        for part in parents:
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, leaf):
            configs[name] = value
    return configs


@functools.lru_cache(maxsize=1)
def host_cpu_fields() -> dict[str, str]:
    """The host CPU, for the cache key: AOTInductor compiles its C++ with ``-march=native``."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "cpu model") and not model:
                    model = v.strip()
                elif k in ("flags", "features") and not flags:
                    flags = v.strip()
                if model and flags:
                    break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "model": model or platform.processor(),
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest(),
    }


def graph_tensor_usage(ep: torch.export.ExportedProgram) -> tuple[set[str], set[str]]:
    """(tensors the graph reads, tensors it lifts but never reads), by state-dict style name."""
    sig = ep.graph_signature
    targets: dict[str, str] = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    used: set[str] = set()
    unused: set[str] = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in targets:
            (used if node.users else unused).add(targets[node.name])
    return used, unused - used


def split_state(
    state: Mapping[str, torch.Tensor], used: set[str]
) -> tuple[dict[str, WeightSpec], frozenset[str], list[str]]:
    """Weight specs (state-dict tensors the graph reads), ignored names, and problems.

    Tied names (one tensor under several names: export reads it under one of them) are one spec,
    under the name the graph reads, the others its aliases. Tensors the graph reads that are not in
    the state dict are :func:`kept_tensors`, not weights.
    """
    problems: list[str] = []
    specs = specs_with_ties(state, used)
    for name in specs:
        t = state[name]
        if not t.is_contiguous():
            problems.append(f"state-dict tensor {name!r} is not contiguous (strides {t.stride()}); "
                            "refit installs contiguous tensors: make it contiguous in the module")
    tied = {n for spec in specs.values() for n in spec.names}
    ignored = frozenset(set(state) - tied)
    return specs, ignored, problems


def kept_tensors(
    ep: torch.export.ExportedProgram, state: Mapping[str, torch.Tensor], used: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Tensors the graph reads that no checkpoint provides, which the engine keeps: (values, why, problems).

    A non-persistent buffer (``register_buffer(..., persistent=False)``, e.g. BERT's ``position_ids``) and a
    tensor constant created while tracing (``lifted_tensor_0``) are not in the state dict, so no checkpoint
    carries them: their values come from the model's code and are part of the engine (and of its cache key).
    """
    buffers = set(ep.graph_signature.inputs_to_buffers.values())
    values: dict[str, torch.Tensor] = {}
    why: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(used - set(state)):
        t = ep.constants.get(name)
        if not isinstance(t, torch.Tensor):
            problems.append(f"the graph reads tensor {name!r}, which is neither in the state dict nor a constant "
                            "of the exported program: the engine cannot hold it")
            continue
        values[name] = t.detach().clone(memory_format=torch.contiguous_format)
        why[name] = ("non-persistent buffer (not in the state dict)" if name in buffers
                     else "tensor constant created while tracing")
    return values, why, problems


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and values (for the cache key of the tensors an engine keeps)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nonpersistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that its state dict leaves out."""
    state = module.state_dict(keep_vars=True)
    return {n: b for n, b in module.named_buffers() if n not in state}


def constant_problems(constant_fqns: Iterable[str], weight_names: Iterable[str],
                      kept: Iterable[str] = ()) -> list[str]:
    """The compiled model's constants must be exactly the state-dict tensors the graph reads, plus the
    tensors the engine keeps (:func:`kept_tensors`)."""
    fqns, names = set(constant_fqns) - set(kept), set(weight_names)
    problems = [
        f"state-dict tensor {n!r} is read by the graph but is not a constant of the compiled model: "
        "it was baked into the code and a refit could never change it (Inductor inlines 0-d tensors and "
        "1-D tensors of <= 8 elements unless always_keep_tensor_constants=True)"
        for n in sorted(names - fqns)
    ]
    problems += [
        f"the compiled model has constant {n!r}, which is not a state-dict tensor the graph reads: "
        "no checkpoint can provide it"
        for n in sorted(fqns - names)
    ]
    return problems


def package_problems(path: Path) -> list[str]:
    """Weights packaged next to the code (they should not be: the engine is stripped)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return [f"{path}: not a readable .pt2 archive: {e}"]
    return [
        f"{path}: the package holds weights ({n}); expected code only "
        "(aot_inductor.package_constants_in_so=False)"
        for n in names
        if "/data/weights/" in n or "/data/constants/" in n or n.endswith("_serialized_weights.bin")
    ]


def is_compact(t: torch.Tensor) -> bool:
    """Contiguous and alone in its storage: what the runner's whole-storage copy needs."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def refit_problems(
    specs: Mapping[str, WeightSpec],
    ignored: frozenset[str],
    weights: Mapping[str, torch.Tensor],
    device: torch.device,
    *,
    full: bool,
) -> list[str]:
    """Everything wrong with a weight set for a slot (:func:`~serving.engines.base.weight_problems`), plus
    what the runner's buffers need: the device's index too, and compact tensors."""

    def runner_needs(name: str, t: torch.Tensor) -> list[str]:
        out = []
        if t.device.type == device.type and device.index is not None and t.device.index != device.index:
            out.append(f"{name!r}: on {t.device}, expected {device} (call transfer() first)")
        if not is_compact(t):
            out.append(f"{name!r}: not contiguous or a view into a larger storage (call transfer() first)")
        return out

    return weight_problems(specs, weights, device, full=full, ignored=ignored, extra=runner_needs)


def cached_spec_problems(
    state: Mapping[str, torch.Tensor], specs: Mapping[str, WeightSpec], ignored: frozenset[str]
) -> list[str]:
    """A cache hit's weight list against the module's state dict (names, shapes, dtypes)."""
    known = {n for spec in specs.values() for n in spec.names}
    problems = [f"module tensor {n!r} is not in the cached weight list"
                for n in state if n not in known and n not in ignored]
    problems += [f"cached weight {n!r} is not in the module's state dict" for n in specs if n not in state]
    for n, s in specs.items():
        t = state.get(n)
        if t is not None and (tuple(t.shape), t.dtype) != (s.shape, s.dtype):
            problems.append(f"cached weight {n!r} is {list(s.shape)} {dtype_name(s.dtype)}, the module has "
                            f"{list(t.shape)} {dtype_name(t.dtype)}")
    return problems


def _weights_meta(specs: Mapping[str, WeightSpec], ignored: frozenset[str]) -> dict[str, object]:
    return {"weights": [s.to_json() for s in specs.values()], "ignored": sorted(ignored)}


def _weights_from_meta(meta: Mapping[str, object]) -> tuple[dict[str, WeightSpec], frozenset[str]]:
    raw = meta["weights"]
    ignored = meta["ignored"]
    if not isinstance(raw, list) or not isinstance(ignored, list):
        raise ValueError("meta.json: 'weights' and 'ignored' must be lists")
    specs = {s.name: s for s in (WeightSpec.from_json(d) for d in raw)}
    return specs, frozenset(str(n) for n in ignored)


def _kept_from_meta(meta: Mapping[str, object]) -> dict[str, str]:
    kept = meta.get("kept", {})
    if not isinstance(kept, dict):
        raise ValueError("meta.json: 'kept' must be an object")
    return {str(k): str(v) for k, v in kept.items()}


def _read_kept(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t.to(device) for n, t in load_file(str(path)).items()}


def _kept_detail(detail: str, why: Mapping[str, str]) -> str:
    if not why:
        return detail
    kept = ", ".join(f"{n!r} ({w})" for n, w in why.items())
    return f"{detail}; kept in the engine, not refitted: {kept}" if detail else f"kept in the engine: {kept}"


# --------------------------------------------------------------------------- engine


class _Runner:
    """The package loader itself (``torch._C._aoti.AOTIModelPackageLoader``), as
    ``torch._inductor.aoti_load_package`` builds it, without the Python wrapper: importing that
    wrapper imports torch._dynamo (about 1.9 s of a cache-hit start, measured); our inputs and
    outputs are flat tensor lists, so the wrapper's pytree handling is not needed."""

    def __init__(self, path: Path, device_index: int) -> None:
        # (path, model_name, run_single_threaded, num_runners, device_index): load_package's call
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, device_index)

    def get_constant_fqns(self) -> list[str]:
        return list(self.loader.get_constant_fqns())

    def load_constants(self, constants: Mapping[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool) -> None:
        # (constants_map, use_inactive, check_full_update, user_managed): AOTICompiledModel.load_constants
        self.loader.load_constants(dict(constants), False, check_full_update, user_managed)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.loader.boxed_run(list(inputs)))


def _load_runner(path: Path, device: torch.device) -> _Runner:
    index = device.index if device.type != "cpu" and device.index is not None else -1
    ensure_loadable(path, device)  # a loader that segfaults here must not take the server down
    try:
        return _Runner(path, index)
    except Exception as e:
        raise EngineBuildError(f"AOTI engine: cannot load the package {path}: {e}") from e


class AOTIEngine(Engine):
    """A weight-stripped AOTInductor package; slots are separately loaded runners."""

    kind = "aoti"

    def __init__(
        self,
        *,
        spec: BuildSpec,
        device: torch.device,
        build_info: BuildInfo,
        package_path: Path,
        workdir: Path,
        weight_specs: Mapping[str, WeightSpec],
        ignored_names: frozenset[str],
        runner: Any = None,
        kept: Mapping[str, torch.Tensor] | None = None,
        kept_why: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(device, build_info)
        self.spec = spec
        self.package_path = package_path
        self._weight_specs = MappingProxyType(dict(weight_specs))
        #: state-dict entries the compiled graph never reads (e.g. BatchNorm ``num_batches_tracked``
        #: in eval mode): not weights of the engine, so a checkpoint may carry them and the validator
        #: accepts and ignores them (the other names of a tied parameter are its spec's aliases)
        self.ignored_names: frozenset[str] = ignored_names
        #: tensors the graph reads that no checkpoint provides (non-persistent buffers, traced constants):
        #: part of the engine, installed into every slot with its weights, never refitted; a checkpoint that
        #: carries one must hold the same value (:func:`~serving.weights.loader.open_checkpoint`'s ``fixed``)
        self.kept_tensors: Mapping[str, torch.Tensor] = MappingProxyType(dict(kept or {}))
        #: why each was kept (the build log says it too)
        self.kept_why: Mapping[str, str] = MappingProxyType(dict(kept_why or {}))
        self._spare_runner = runner  # loaded for the build checks; the first slot takes it
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(workdir), True)

    # -- build -------------------------------------------------------------------

    @classmethod
    def build(
        cls, spec: BuildSpec, *, cache: EngineCache | None, metrics: HotswapMetrics | None = None
    ) -> AOTIEngine:
        """Load from ``cache`` when it holds this build, else export, compile and store.

        ``metrics`` is accepted for a uniform build signature; cache events are counted by the
        cache's own metrics.
        """
        t0 = time.perf_counter()
        device = build_device(spec, "AOTI engine")
        module = make_module(spec, device, meta=cache is not None)
        if any(b.is_meta for b in nonpersistent_buffers(module).values()):
            module = make_module(spec, device)  # their values are part of the engine (and of the key)
        graph = graph_fingerprint(module, spec.factory, spec.kwargs())
        extra: dict[str, object] = {"host_cpu": host_cpu_fields(), "example_batch": EXAMPLE_BATCH}
        nonpersistent = nonpersistent_buffers(module)
        if nonpersistent:
            extra["nonpersistent_sha256"] = tensors_sha256(nonpersistent)
        # the key names every setting asked for; which optional ones a torch applies follows from its
        # version, itself in the key (asking torch._inductor would import torch._dynamo: ~2 s per hit)
        key_flags = {**INDUCTOR_CONFIGS, **OPTIONAL_INDUCTOR_CONFIGS}
        fields = cache_key_fields(
            engine=cls.kind, graph=graph, spec=spec, build_flags=key_flags, device=device, extra=extra,
        )
        key = cache_key(fields)
        workdir = Path(tempfile.mkdtemp(prefix="hotswap-aoti-"))
        try:
            detail = ""
            if cache is not None:
                try:
                    engine = cls._from_cache(spec, device, module, cache, key, workdir, t0)
                except CacheError as e:
                    log.warning("AOTI engine: cache unusable, building without it: %s", e)
                    engine, detail, cache = None, f"cache unusable: {e}", None
                if engine is not None:
                    return engine
            return cls._compile(spec, device, module, cache, key, fields, inductor_configs(), workdir, t0,
                                detail)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    @classmethod
    def _from_cache(
        cls, spec: BuildSpec, device: torch.device, module: torch.nn.Module, cache: EngineCache,
        key: str, workdir: Path, t0: float,
    ) -> AOTIEngine | None:
        package = workdir / PACKAGE_FILE

        def copy_out(entry: CacheEntry) -> Mapping[str, object]:
            # our own copy: slots load it later, after the entry may have been evicted
            shutil.copyfile(entry.files[PACKAGE_FILE], package)
            if entry.meta.get("kept"):
                shutil.copyfile(entry.files[KEPT_FILE], workdir / KEPT_FILE)
            return entry.meta

        try:
            meta = cache.load(key, copy_out)
        except OSError as e:  # our own copy failed (e.g. the temp folder is full): not the entry's fault
            raise CacheError(f"AOTI engine: cannot copy the cached package to {package}: {e}") from e
        except KeyError as e:
            meta, problems = {}, [f"the entry has no {PACKAGE_FILE} ({e})"]
        else:
            if meta is None:
                return None
            problems = []
        try:
            if not problems:
                specs, ignored = _weights_from_meta(meta)
                why = _kept_from_meta(meta)
                kept = _read_kept(workdir / KEPT_FILE, device) if why else {}
                problems = cached_spec_problems(module.state_dict(), specs, ignored - set(why))
                if set(kept) != set(why):
                    problems.append(f"kept tensors {sorted(why)} listed, {sorted(kept)} stored")
            if not problems:
                runner = _load_runner(package, device)
                problems = constant_problems(runner.get_constant_fqns(), specs, kept)
        except (EngineBuildError, KeyError, ValueError, TypeError) as e:
            problems = [str(e)]
        if problems:
            # a key collision or a half-compatible entry: never serve it, rebuild instead
            log.warning("AOTI engine: cache entry %s does not fit this model (%s); rebuilding",
                        key, "; ".join(problems))
            cache.remove(key)
            return None
        elapsed = time.perf_counter() - t0
        detail = "loaded from the engine cache"
        built = meta.get("build_seconds")
        if isinstance(built, (int, float)):
            detail += f"; the cold build took {built:.1f}s, {max(0.0, built - elapsed):.1f}s saved"
        info = BuildInfo("hit", elapsed, key, _kept_detail(detail, why))
        return cls(spec=spec, device=device, build_info=info, package_path=package, workdir=workdir,
                   weight_specs=specs, ignored_names=ignored, runner=runner, kept=kept, kept_why=why)

    @classmethod
    def _compile(
        cls, spec: BuildSpec, device: torch.device, module: torch.nn.Module, cache: EngineCache | None,
        key: str, fields: Mapping[str, object], configs: Mapping[str, object], workdir: Path, t0: float,
        detail: str,
    ) -> AOTIEngine:
        if any(t.is_meta for t in module.state_dict().values()):
            module = make_module(spec, device)
        with torch.no_grad():
            ep = export(module, spec, device)

        used, _ = graph_tensor_usage(ep)
        state = module.state_dict()
        specs, ignored, problems = split_state(state, used)
        kept, why, kept_issues = kept_tensors(ep, state, used)
        problems += kept_issues
        if problems:
            raise EngineBuildError(f"AOTI engine for {spec.factory}: " + "; ".join(problems))
        ignored = ignored | frozenset(kept)
        for name, reason in why.items():
            log.info("AOTI engine for %s: keeping %r in the engine (%s; no checkpoint provides it; its value "
                     "is part of the cache key)", spec.factory, name, reason)
        kept = {n: t.to(device) for n, t in kept.items()}
        if kept:
            from safetensors.torch import save_file

            save_file({n: t.to("cpu") for n, t in kept.items()}, str(workdir / KEPT_FILE))

        package = workdir / PACKAGE_FILE
        t_compile = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(package), inductor_configs=dict(configs)
            )
        except Exception as e:
            raise EngineBuildError(f"AOTI engine: AOTInductor compile of {spec.factory} failed: {e}") from e
        compile_s = time.perf_counter() - t_compile

        problems = package_problems(package)
        runner = _load_runner(package, device)
        problems += constant_problems(runner.get_constant_fqns(), specs, kept)
        if problems:
            raise EngineBuildError(
                f"AOTI engine for {spec.factory}: {len(problems)} problem(s), refusing an engine with "
                "weights baked in:\n" + "\n".join(f"  - {p}" for p in problems)
            )

        outcome = "bypass"
        detail = _kept_detail("; ".join(x for x in (detail, f"compiled in {compile_s:.1f}s") if x), why)
        if cache is not None:
            outcome = "miss"
            meta = {"fields": dict(fields), "factory": spec.factory, **_weights_meta(specs, ignored),
                    "kept": dict(why), "build_seconds": round(time.perf_counter() - t0, 3)}
            files = {PACKAGE_FILE: package, **({KEPT_FILE: workdir / KEPT_FILE} if kept else {})}
            try:
                cache.store(key, files, meta)
            except CacheError as e:  # the engine is fine; only the next build will be slower
                log.warning("AOTI engine: could not store in the cache: %s", e)
                detail += f"; not stored: {e}"
        info = BuildInfo(outcome, time.perf_counter() - t0, key, detail)
        return cls(spec=spec, device=device, build_info=info, package_path=package, workdir=workdir,
                   weight_specs=specs, ignored_names=ignored, runner=runner, kept=kept, kept_why=why)

    # -- Engine ------------------------------------------------------------------

    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self._weight_specs

    def new_slot(self) -> AOTISlot:
        if not self._finalizer.alive:
            raise NotReadyError(f"AOTI engine {self.spec.factory} is closed")
        with self._lock:
            runner, self._spare_runner = self._spare_runner, None
        if runner is None:
            runner = _load_runner(self.package_path, self.device)
        return AOTISlot(self, runner)

    def close(self) -> None:
        self._spare_runner = None
        self._finalizer()

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs on the engine device, contiguous, checked against the spec.

        The compiled code does not check shapes itself (AOTI_RUNTIME_CHECK_INPUTS is off by
        default); a wrong shape would read out of bounds.
        """
        problems = input_problems(self.spec, inputs)
        if problems:
            raise ValueError("AOTI engine inputs: " + "; ".join(problems))
        return [x.to(self.device).contiguous() for x in inputs]


class AOTISlot(WeightSlot):
    """One loaded runner whose constants are this slot's own buffers.

    The buffers are allocated once and registered with the runner once (``user_managed=True``:
    the runner points at them); every refit then only writes into them. Registering the *same*
    tensors is what makes the user-managed form safe here: torch 2.13's ``user_managed`` keeps an
    extra reference to each tensor it is given and never drops it (module docstring), which leaks
    a weight set per refit if new tensors are passed each time, but costs nothing for buffers that
    live as long as the slot anyway.
    """

    def __init__(self, engine: AOTIEngine, runner: Any) -> None:
        self.engine = engine
        self._runner: Any = runner
        self._ready = False
        self._registered = False
        self._buffers: dict[str, torch.Tensor] | None = None

    def buffers(self) -> Mapping[str, torch.Tensor]:
        if self._buffers is None:
            self._buffers = {n: torch.empty(s.shape, dtype=s.dtype, device=self.engine.device)
                             for n, s in self.engine.weight_specs().items()}
        return self._buffers

    @property
    def ready(self) -> bool:
        return self._ready

    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights on the engine device, in the engine dtype, compact; no copy when already so.

        A view into a larger storage is cloned: the runner copies whole storages (see the module
        docstring). Ignored names are dropped; unknown names pass through for :meth:`refit` to report.
        """
        specs = self.engine.weight_specs()
        out: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            if name in self.engine.ignored_names:
                continue
            spec = specs.get(name)
            convert = spec is not None and t.is_floating_point() and spec.dtype.is_floating_point
            dtype = spec.dtype if convert and spec is not None else t.dtype
            t = t.to(device=self.engine.device, dtype=dtype)
            out[name] = t if is_compact(t) else t.clone(memory_format=torch.contiguous_format)
        return out

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights`` into this slot's buffers (tensors that already are the buffers, because a
        loader wrote into :meth:`buffers`, are not copied); the caller's tensors may be freed afterwards.

        The first refit must be complete; a later one may be partial (the buffers keep the rest).
        """
        if self._runner is None:
            raise NotReadyError("AOTI slot is closed")
        first = not self._ready
        engine = self.engine
        problems = refit_problems(
            engine.weight_specs(), engine.ignored_names, weights, engine.device, full=first
        )
        if problems:
            raise ValidationError(f"refit of AOTI engine {engine.spec.factory}", problems)
        buffers = self.buffers()
        try:
            with torch.no_grad():
                for name, t in weights.items():
                    if name in engine.ignored_names:
                        continue
                    dest = buffers[name]
                    if dest.numel() and t.data_ptr() == dest.data_ptr():
                        continue  # written in place by the loader
                    dest.copy_(t)
            if not self._registered:
                self._runner.load_constants({**engine.kept_tensors, **buffers}, check_full_update=True,
                                            user_managed=True)
                self._registered = True
        except Exception as e:
            self._ready = False  # part of the update may be in: not a consistent weight set
            raise RefitError(
                f"AOTI engine {engine.spec.factory}: refit failed ({e}); this slot needs a full "
                "refit before it can run again"
            ) from e
        self._ready = True

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self._ready or self._runner is None:
            # a stripped runner without constants reads null pointers (it segfaults, measured)
            raise NotReadyError(
                f"AOTI engine {self.engine.spec.factory}: this slot has no weights yet; refit it first"
            )
        xs = self.engine.check_inputs(inputs)
        with torch.no_grad():
            out = self._runner(*xs)
        return list(pytree.tree_leaves(out))

    def close(self) -> None:
        self._runner = None
        self._ready = False
