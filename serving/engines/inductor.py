"""The Inductor engine: ``torch.compile`` with the weights as graph inputs, cached without them.

How the weights stay refittable
    The factory's module is compiled through a function ``call(module, *inputs)`` whose first
    argument is the module itself: Dynamo inlines built-in ``nn.Module``s and lifts every parameter
    and buffer it reads into a *graph input*, and ``freezing`` stays off (:data:`INDUCTOR_OPTIONS`),
    so Inductor never folds a weight into a constant or inlines a small one into the code. Each slot
    owns a module (its own weight storage) and passes it in; a refit ``copy_()``s new values into
    that storage, which the compiled code reads on its next call. The build checks this empirically
    (:func:`refit_check`): after warm-up it refits the slot to different random weights and compares
    the compiled output with the eager module on the same weights; an engine that does not follow
    (a weight baked in) is refused, naming the tensors.

Shapes
    The batch dimension is dynamic in ``[1, max_batch]`` (``mark_dynamic``); Dynamo specializes
    batch 1, so the warm-up runs batch 1, 2 and ``max_batch``: two graphs cover every batch size and no
    request ever waits on a compile. Every engine compiles its own copy of ``call`` (a fresh code
    object), so Dynamo's in-memory cache never hands it another engine's graphs.

Cache entry (no weights)
    Compiling happens inside a private Inductor cache folder. After warm-up the entry stores
    ``torch.compiler.save_cache_artifacts()`` (the mega-cache: FX graph and AOTAutograd cache entries,
    with Triton kernels bundled on CUDA) as :data:`ARTIFACTS_FILE`, plus the compiled kernels the
    mega-cache does not carry (on CPU the C++ kernels' shared objects: without them a hit still runs
    the C++ compiler, measured ~80% of a cold build on two cores) as :data:`KERNELS_FILE`. A hit in a
    fresh process unpacks both into a new private folder and calls ``load_cache_artifacts`` before
    compiling, so Dynamo traces but Inductor neither generates nor compiles code.

CUDA graphs (``cuda_graphs: true``)
    Each slot captures one graph per batch bucket (powers of two up to ``max_batch``, and
    ``max_batch``) against its own weight storage and static input buffers; a request is padded to
    its bucket. Refits copy into that same storage and synchronize before returning, and the refit
    coordinator only swaps to a slot after its refit: a graph never replays against a half-written slot.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.utils._pytree as pytree

from serving.cache import CacheEntry, EngineCache, cache_key, cache_key_fields, graph_fingerprint
from serving.engines.base import BuildInfo, Engine, WeightSlot, build_device, weight_problems
from serving.engines.export import input_problems, make_module
from serving.errors import (
    CacheError,
    ConfigError,
    EngineBuildError,
    EngineUnavailableError,
    NotReadyError,
    RefitError,
    ValidationError,
)
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, WeightSpec, specs_with_ties

log = logging.getLogger(__name__)

#: Inductor config of every build (part of the cache key), set for the compile and warm-up.
#: ``freezing`` would turn the weights into constants of the compiled code (folded, packed,
#: inlined; measured: with it on, ``copy_()`` into the weights no longer changes the outputs): never.
INDUCTOR_OPTIONS: dict[str, bool] = {"freezing": False}
#: payload files of a cache entry
ARTIFACTS_FILE = "artifacts.bin"
KERNELS_FILE = "kernels.tar"
#: folders of the private Inductor cache that the mega-cache already carries (or that are not code)
_NOT_KERNELS = ("fxgraph", "aotautograd", "locks")
_names = iter(range(1 << 62))


# --------------------------------------------------------------------------- pure helpers


def warmup_batches(max_batch: int) -> tuple[int, ...]:
    """Batch 1 (its own, specialized graph), 2 and ``max_batch`` (the dynamic graph)."""
    return tuple(sorted({1, min(2, max_batch), max_batch}))


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a CUDA graph: powers of two below ``max_batch``, and ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch size {n} is larger than the largest CUDA graph ({buckets[-1]})")


def probe_weights(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A different, plausible value for every floating tensor (others unchanged). Pure but for RNG use.

    Tensors that are never negative (norm scales, running variances, zero-initialized biases) stay
    non-negative and become non-zero; the others get noise on their own scale.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not t.is_floating_point() or not t.numel():
            out[name] = t.detach().clone()
            continue
        host = t.detach().float().cpu()
        noise = torch.rand(host.shape, generator=gen)
        if bool((host >= 0).all()):
            new = host * (0.5 + noise) + 0.1 * torch.rand(host.shape, generator=gen)
        else:
            scale = float(host.std()) if host.numel() > 1 else float(host.abs().max())
            new = host + max(scale, 1e-2) * (2 * noise - 1)
        out[name] = new.to(device=t.device, dtype=t.dtype)
    return out


def kernel_files(root: Path) -> list[Path]:
    """Files under a private Inductor cache folder that hold compiled kernels (relative paths)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and rel.parts[0] not in _NOT_KERNELS:
            out.append(rel)
    return out


def pack_kernels(root: Path, dest: Path) -> int:
    """Tar the kernel files of ``root`` into ``dest``; the number of files."""
    files = kernel_files(root)
    with tarfile.open(dest, "w") as tar:
        for rel in files:
            tar.add(root / rel, arcname=str(rel), recursive=False)
    return len(files)


def unpack_kernels(archive: Path, root: Path) -> None:
    """Extract a :func:`pack_kernels` archive into ``root`` (regular files only, nothing outside)."""
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _weights_meta(specs: Mapping[str, WeightSpec]) -> dict[str, object]:
    return {"weights": [s.to_json() for s in specs.values()]}


def _specs_from_meta(meta: Mapping[str, object]) -> dict[str, WeightSpec]:
    raw = meta["weights"]
    if not isinstance(raw, list):
        raise ValueError("meta.json: 'weights' must be a list")
    return {s.name: s for s in (WeightSpec.from_json(d) for d in raw)}


# --------------------------------------------------------------------------- compiling


def _entry_point() -> Callable[..., Any]:
    """A fresh ``call(module, *inputs)``: its own code object, so its own Dynamo cache."""

    def call(module: torch.nn.Module, *inputs: torch.Tensor) -> Any:
        return module(*inputs)

    name = f"hotswap_inductor_{next(_names)}"
    code = call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, call.__globals__, name)


@contextmanager
def _private_inductor_cache(folder: Path) -> Iterator[None]:
    """Compile into ``folder`` (Inductor's and Triton's caches), with in-memory caches cleared."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    triton = os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's kernels then land in the folder too
    try:
        with temporary_cache_dir(str(folder)):
            yield
    finally:
        if triton is not None:
            os.environ["TRITON_CACHE_DIR"] = triton


def _inductor_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}


def _device_of(spec: BuildSpec) -> torch.device:
    device = build_device(spec, "Inductor engine")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise EngineUnavailableError(
                "Inductor engine: Inductor generates Triton kernels on CUDA, but the 'triton' package is "
                "missing or does not work with this GPU; install the triton version this torch pins "
                "(pip install triton) or choose engine 'eager'")
    return device


def cuda_graphs_of(spec: BuildSpec) -> bool:
    """The ``cuda_graphs`` option of a build (only on CUDA)."""
    on = bool(spec.option("cuda_graphs", False))
    if on and not spec.device.startswith("cuda"):
        raise ConfigError(f"cuda_graphs: true needs a CUDA device; this model instance runs on {spec.device!r}")
    return on


# --------------------------------------------------------------------------- engine


class InductorEngine(Engine):
    """``torch.compile``'d code shared by all slots; each slot is a module with its own weights."""

    kind = "inductor"

    def __init__(self, *, spec: BuildSpec, device: torch.device, build_info: BuildInfo, fn: Callable[..., Any],
                 weight_specs: Mapping[str, WeightSpec], workdir: Path, spare: InductorSlot | None = None,
                 kept: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(device, build_info)
        self.spec = spec
        #: tensors the module reads that are not weights (non-persistent buffers): each slot keeps the
        #: factory's values; a checkpoint may carry them only with these values (``fixed`` in the loader)
        self.kept_tensors: Mapping[str, torch.Tensor] = MappingProxyType(dict(kept or {}))
        self.fn = fn
        self.cuda_graphs = cuda_graphs_of(spec)
        self._weight_specs = MappingProxyType(dict(weight_specs))
        self._spare = spare  # the warm-up slot; the first new_slot() takes it
        if spare is not None:
            spare.engine = self
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(workdir), True)

    # -- build -------------------------------------------------------------------

    @classmethod
    def build(cls, spec: BuildSpec, *, cache: EngineCache | None,
              metrics: HotswapMetrics | None = None) -> InductorEngine:
        """Compile (loading the compiler's artifacts from ``cache`` when it holds them), warm up, check."""
        t0 = time.perf_counter()
        device = _device_of(spec)
        cuda_graphs = cuda_graphs_of(spec)
        fields = cls.key_fields(spec, device, cuda_graphs)
        key = cache_key(fields)
        workdir = Path(tempfile.mkdtemp(prefix="hotswap-inductor-"))
        compile_dir = workdir / "inductor"
        compile_dir.mkdir()
        try:
            entry_meta: Mapping[str, object] | None = None
            artifacts: bytes | None = None
            detail = ""
            if cache is not None:
                try:
                    loaded = cls._load_entry(cache, key, compile_dir)
                except CacheError as e:
                    log.warning("Inductor engine: cache unusable, building without it: %s", e)
                    loaded, detail, cache = None, f"cache unusable: {e}", None
                if loaded is not None:
                    entry_meta, artifacts = loaded
            module = make_module(spec, device)
            # tied parameters are one weight (the other names its aliases); non-persistent buffers are not
            # weights: they stay in the module, read by the compiled code like any other attribute
            specs = specs_with_ties(module.state_dict(keep_vars=True))
            state = {k: v.detach() for k, v in module.state_dict().items() if k in specs}
            kept = non_persistent_buffers(module)
            if entry_meta is not None:
                problems = cls._entry_problems(entry_meta, specs)
                if problems:
                    assert cache is not None
                    log.warning("Inductor engine: cache entry %s does not fit this model (%s); rebuilding",
                                key, "; ".join(problems))
                    cache.remove(key)
                    entry_meta, artifacts = None, None
                    shutil.rmtree(compile_dir)
                    compile_dir.mkdir()

            before = _inductor_counters()
            t_compile = time.perf_counter()
            # the global config, not torch.compile(options=...): there, freezing is not applied (measured,
            # torch 2.13), so a user's TORCHINDUCTOR_FREEZING=1 would still bake the weights in
            with _private_inductor_cache(compile_dir), torch._inductor.config.patch(_build_config()):
                from torch.compiler._cache import CacheArtifactManager

                CacheArtifactManager.clear()  # what is saved below is this build's, nothing older
                if artifacts is not None:
                    torch.compiler.load_cache_artifacts(artifacts)
                fn = torch.compile(_entry_point(), backend="inductor")
                slot = InductorSlot(spec, device, fn, module, specs, cuda_graphs=False)
                slot.refit(state)
                slot.warm_up()
                refit_check(slot, spec, state)
                slot.reset()  # holds probe weights now: it must be refitted before it serves
                saved = torch.compiler.save_cache_artifacts() if entry_meta is None else None
            compile_s = time.perf_counter() - t_compile
            counts = {k: v - before.get(k, 0) for k, v in _inductor_counters().items()}
            hits, misses = counts.get("fxgraph_cache_hit", 0), counts.get("fxgraph_cache_miss", 0)
            if cuda_graphs:
                slot.capture_graphs()

            if entry_meta is not None:
                outcome = "hit"
                detail = f"loaded from the engine cache ({hits} graph(s) from it, {misses} compiled)"
                built = entry_meta.get("build_seconds")
                if isinstance(built, (int, float)):
                    elapsed = time.perf_counter() - t0
                    detail += f"; the cold build took {built:.1f}s, {max(0.0, built - elapsed):.1f}s saved"
            else:
                outcome = "bypass"
                detail = "; ".join(x for x in (detail, f"compiled and warmed up in {compile_s:.1f}s") if x)
                if cache is not None:
                    outcome = "miss"
                    detail += cls._store(cache, key, fields, spec, specs, saved, compile_dir, workdir, t0)
            if kept:
                detail += "; kept in the engine, not refitted: " + ", ".join(
                    f"{n!r} (non-persistent buffer)" for n in kept)
            info = BuildInfo(outcome, time.perf_counter() - t0, key, detail)
            return cls(spec=spec, device=device, build_info=info, fn=fn, weight_specs=specs, workdir=workdir,
                       spare=slot, kept=kept)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            stop_compile_workers()

    @classmethod
    def key_fields(cls, spec: BuildSpec, device: torch.device, cuda_graphs: bool) -> dict[str, object]:
        """The strict cache key: architecture, inputs, batch range, dtype, torch, device, options."""
        from serving.engines.aoti import host_cpu_fields

        module = make_module(spec, device, meta=True)
        graph = graph_fingerprint(module, spec.factory, spec.kwargs())
        extra: dict[str, object] = {"warmup_batches": list(warmup_batches(spec.max_batch)),
                                    "cuda_graphs": cuda_graphs}
        if device.type == "cpu":
            extra["host_cpu"] = host_cpu_fields()  # C++ kernels are built with -march=native
        else:
            try:
                import triton

                extra["triton"] = str(triton.__version__)
            except ImportError:
                extra["triton"] = None
        return cache_key_fields(engine=cls.kind, graph=graph, spec=spec, build_flags=INDUCTOR_OPTIONS,
                                device=device, extra=extra)

    @staticmethod
    def _load_entry(cache: EngineCache, key: str, compile_dir: Path) -> tuple[Mapping[str, object], bytes] | None:
        def read(entry: CacheEntry) -> tuple[Mapping[str, object], bytes]:
            data = entry.files[ARTIFACTS_FILE].read_bytes()
            if KERNELS_FILE in entry.files:
                unpack_kernels(entry.files[KERNELS_FILE], compile_dir)
            return entry.meta, data

        try:
            return cache.load(key, read)
        except (KeyError, tarfile.TarError) as e:
            log.warning("Inductor engine: cache entry %s is unusable (%s: %s); rebuilding", key,
                        type(e).__name__, e)
            cache.remove(key)
            return None
        except OSError as e:
            raise CacheError(f"Inductor engine: cannot unpack the cached kernels into {compile_dir}: {e}") from e

    @staticmethod
    def _entry_problems(meta: Mapping[str, object], specs: Mapping[str, WeightSpec]) -> list[str]:
        try:
            cached = _specs_from_meta(meta)
        except (KeyError, ValueError, TypeError) as e:
            return [f"unreadable weight list ({e})"]
        if cached != dict(specs):
            return [f"cached weights {sorted(set(cached) ^ set(specs))[:5] or 'shapes/dtypes'} differ from the module"]
        return []

    @staticmethod
    def _store(cache: EngineCache, key: str, fields: Mapping[str, object], spec: BuildSpec,
               specs: Mapping[str, WeightSpec], saved: tuple[bytes, Any] | None, compile_dir: Path,
               workdir: Path, t0: float) -> str:
        if saved is None:
            log.warning("Inductor engine: torch produced no cache artifacts (are Inductor's caches disabled, "
                        "e.g. TORCHINDUCTOR_FORCE_DISABLE_CACHES?); nothing stored")
            return "; not stored: torch produced no cache artifacts"
        files = {ARTIFACTS_FILE: workdir / ARTIFACTS_FILE, KERNELS_FILE: workdir / KERNELS_FILE}
        try:
            files[ARTIFACTS_FILE].write_bytes(saved[0])
            n = pack_kernels(compile_dir, files[KERNELS_FILE])
            meta = {"fields": dict(fields), "factory": spec.factory, **_weights_meta(specs), "kernel_files": n,
                    "build_seconds": round(time.perf_counter() - t0, 3)}
            cache.store(key, files, meta)
        except (CacheError, OSError) as e:  # the engine is fine; only the next start will be slower
            log.warning("Inductor engine: could not store in the cache: %s", e)
            return f"; not stored: {e}"
        finally:
            for p in files.values():
                p.unlink(missing_ok=True)
        return ""

    # -- Engine ------------------------------------------------------------------

    def weight_specs(self) -> Mapping[str, WeightSpec]:
        return self._weight_specs

    def new_slot(self) -> InductorSlot:
        if not self._finalizer.alive:
            raise NotReadyError(f"Inductor engine {self.spec.factory} is closed")
        with self._lock:
            slot, self._spare = self._spare, None
        if slot is None:
            slot = InductorSlot(self.spec, self.device, self.fn, make_module(self.spec, self.device),
                                self._weight_specs, cuda_graphs=self.cuda_graphs)
            slot.engine = self
            if self.cuda_graphs:
                slot.capture_graphs()
        return slot

    def close(self) -> None:
        self._spare = None
        self._finalizer()


def _build_config() -> dict[str, bool]:
    """:data:`INDUCTOR_OPTIONS`, and compile workers without an idle timer: its thread would outlive
    :func:`stop_compile_workers` by up to a minute (it only checks for exit between long sleeps)."""
    config = dict(INDUCTOR_OPTIONS)
    if hasattr(torch._inductor.config, "quiesce_async_compile_pool"):
        config["quiesce_async_compile_pool"] = False
    return config


def stop_compile_workers() -> None:
    """Stop Inductor's compile workers (its thread pool and subprocess pools; torch starts them lazily).

    Every graph serving uses is compiled at build, so a served model keeps no compiler thread running
    and leaves no child process behind (they are started again if anything compiles later).
    """
    from torch._inductor import async_compile

    async_compile.shutdown_compile_workers()  # the subprocess pools
    pool = async_compile.AsyncCompile.pool  # the thread pool is not in the set above (torch 2.13)
    if pool.cache_info().currsize:
        pool().shutdown(wait=True)
        pool.cache_clear()


def non_persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers outside the state dict (e.g. transformers' ``position_ids``), on the CPU: not weights."""
    persistent = set(module.state_dict())
    return {n: b.detach().cpu() for n, b in module.named_buffers() if n not in persistent}


def refit_check(slot: InductorSlot, spec: BuildSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an engine whose compiled code does not follow a refit of every weight.

    ``slot`` holds ``state`` and is warmed up. It is refitted to :func:`probe_weights` and its output
    compared with the eager module on the same weights, at batch 1 and ``max_batch`` (both graphs).
    On a mismatch each tensor is tried alone, to name the ones that are baked in.
    """
    probe = probe_weights(state, seed=1)
    reference = make_module(spec, slot.device)
    reference.load_state_dict(probe, strict=False)  # tied aliases follow the name they share storage with
    base = {k: v.detach().clone() for k, v in state.items()}
    slot.refit(probe)
    batches = sorted({1, spec.max_batch})
    inputs = [_random_inputs(spec, n, slot.device, seed=n) for n in batches]
    mismatches = [p for xs in inputs if (p := _mismatch(slot.run(xs), _eager(reference, xs)))]
    if not mismatches:
        return
    baked = []
    for name in (n for n, t in base.items() if t.is_floating_point()):
        slot.refit(base)
        reference.load_state_dict(base, strict=False)
        before = slot.run(inputs[-1])
        slot.refit({name: probe[name]})
        reference.load_state_dict({**base, name: probe[name]}, strict=False)
        after, expected = slot.run(inputs[-1]), _eager(reference, inputs[-1])
        if _mismatch(after, expected) and not _mismatch(after, before):
            baked.append(name)
    raise EngineBuildError(
        f"Inductor engine for {spec.factory}: the compiled code does not follow a refit "
        f"({'; '.join(mismatches)}); weights baked into the code: {baked or 'not narrowed to single tensors'}. "
        "A weight-stripped engine must read every weight as a graph input: check that nothing turns them into "
        "constants (torch._inductor.config.freezing, a forward that reads a weight as a Python number)")


def _random_inputs(spec: BuildSpec, n: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in spec.inputs:
        shape = (n, *s.shape)
        if s.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(device=device, dtype=s.dtype))
        else:
            out.append(torch.randint(0, 4, shape, generator=gen).to(device=device, dtype=s.dtype))
    return out


def _eager(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(pytree.tree_leaves(module(*inputs)))


def _tolerance(t: torch.Tensor) -> float:
    """Relative tolerance of a comparison with eager: float32 keeps about 1e-4 over a network's reductions;
    half precision, and float32 on a GPU whose matmuls or cuDNN convolutions use TF32 (cuDNN's default,
    for eager and compiled code alike, with different roundings), about 2e-2.

    The flags are read, never changed: TorchDynamo guards on them, so a check run under other flags would
    compile, and test, other code than serving runs.
    """
    tf32 = t.is_cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    return 1e-4 if t.dtype in (torch.float32, torch.float64) and not tf32 else 2e-2


def _mismatch(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> str:
    """'' when equal within :func:`_tolerance` times the output's scale, else how far off.

    A weight baked into the code gives outputs of another model: off by a good part of their scale.
    Rounding (another reduction order, fused kernels) stays well below that even when a deep network's
    outputs are large.
    """
    if len(got) != len(expected):
        return f"{len(got)} outputs, eager has {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, eager {tuple(b.shape)}"
        scale = max(1.0, b.float().abs().max().item()) if b.numel() else 1.0
        err = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
        if not err <= _tolerance(a) * scale:  # NaN fails too
            return (f"output {i} of batch {b.shape[0] if b.dim() else 0} differs from eager by {err:.3g} "
                    f"(outputs up to {scale:.3g})")
    return ""


class InductorSlot(WeightSlot):
    """A module of its own (its weight storage) run through the engine's compiled code.

    A refit copies into the module's tensors in place; they never move, so compiled code and captured
    CUDA graphs always read the slot's current weights.
    """

    def __init__(self, spec: BuildSpec, device: torch.device, fn: Callable[..., Any], module: torch.nn.Module,
                 specs: Mapping[str, WeightSpec], *, cuda_graphs: bool) -> None:
        self.spec = spec
        self.device = device
        self.fn = fn
        self.engine: InductorEngine | None = None
        module.requires_grad_(False)
        self.module = module
        self._specs = specs
        self._tensors = {k: v.detach() for k, v in module.state_dict().items() if k in specs}
        self._ready = False
        self._graphs: _Graphs | None = None
        if cuda_graphs and device.type != "cuda":
            raise ConfigError("cuda_graphs: true needs a CUDA device")

    @property
    def ready(self) -> bool:
        return self._ready

    def buffers(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def transfer(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights on the engine device, floating ones in the engine's dtype; no copy when already so."""
        out: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            spec = self._specs.get(name)
            convert = spec is not None and t.is_floating_point() and spec.dtype.is_floating_point
            out[name] = t.to(device=self.device, dtype=spec.dtype if convert and spec is not None else t.dtype)
        return out

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights`` into this slot's tensors (tensors that already are them are skipped).

        The first refit must be complete; later ones may be partial. On CUDA it returns once the copies
        are done, so a slot is never run (or swapped in) half-written.
        """
        first = not self._ready
        problems = weight_problems(self._specs, weights, self.device, full=first)
        if problems:
            raise ValidationError(f"refit of Inductor engine {self.spec.factory}", problems)
        try:
            with torch.no_grad():
                for name, t in weights.items():
                    dest = self._tensors[name]
                    if dest.numel() and t.data_ptr() == dest.data_ptr():
                        continue  # written in place by the loader
                    dest.copy_(t)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as e:
            self._ready = False
            raise RefitError(f"Inductor engine {self.spec.factory}: refit failed ({e}); this slot needs a full "
                             "refit before it can run again") from e
        self._ready = True

    def warm_up(self) -> None:
        """Compile every graph serving will use: batch 1 and the dynamic batch (run at 2 and max)."""
        for n in warmup_batches(self.spec.max_batch):
            xs = _random_inputs(self.spec, n, self.device, seed=n)
            if n > 1:
                for x in xs:
                    torch._dynamo.mark_dynamic(x, 0, min=1, max=self.spec.max_batch)
            self._call(xs)

    def capture_graphs(self) -> None:
        """Capture this slot's CUDA graphs (once; the compiled code must be warmed up)."""
        if self._graphs is None:
            self._graphs = _Graphs(self.spec, self.device, functools.partial(self._call), graph_buckets(
                self.spec.max_batch))

    def _call(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(pytree.tree_leaves(self.fn(self.module, *xs)))

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self._ready:
            raise NotReadyError(f"Inductor engine {self.spec.factory}: this slot has no weights yet; refit it first")
        problems = input_problems(self.spec, inputs)
        if problems:
            raise ValueError("Inductor engine inputs: " + "; ".join(problems))
        # inference tensors (made under torch.inference_mode) would fail a guard and recompile
        xs = [x.to(self.device) for x in inputs]
        xs = [x.clone() if x.is_inference() else x for x in xs]
        if self._graphs is not None:
            return self._graphs.run(xs)
        return self._call(xs)

    def reset(self) -> None:
        """Mark the slot as holding no weights (its next refit must be complete)."""
        self._ready = False

    def close(self) -> None:
        self._ready = False
        self._graphs = None


class _Graphs:
    """One CUDA graph per batch bucket, captured against the slot's weights and static input buffers."""

    def __init__(self, spec: BuildSpec, device: torch.device, call: Callable[[Sequence[torch.Tensor]],
                 list[torch.Tensor]], buckets: Sequence[int]) -> None:
        self.buckets = tuple(buckets)
        self.device = device
        self._lock = threading.Lock()  # static buffers: one replay at a time
        self._static: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.cuda.CUDAGraph]] = {}
        with torch.cuda.device(device):
            for b in sorted(self.buckets, reverse=True):
                xs = [torch.zeros((b, *s.shape), dtype=s.dtype, device=device) for s in spec.inputs]
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    call(xs)  # warm-up on a side stream, as torch.cuda.graph's docs ask
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outs = call(xs)
                self._static[b] = (xs, outs, graph)
            torch.cuda.synchronize(device)

    def run(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = int(xs[0].shape[0])
        b = bucket_for(n, self.buckets)
        static_in, static_out, graph = self._static[b]
        with self._lock:
            for dst, src in zip(static_in, xs, strict=True):
                dst[:n].copy_(src)
            graph.replay()
            return [o[:n].clone() for o in static_out]


def artifact_bytes(entry: CacheEntry) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every payload file of an entry, the tar's members unpacked (for inspection)."""
    for name, path in entry.files.items():
        if name == KERNELS_FILE:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    f = tar.extractfile(member)
                    if f is not None:
                        yield f"{name}:{member.name}", f.read()
        else:
            yield name, path.read_bytes()


__all__ = ["ARTIFACTS_FILE", "INDUCTOR_OPTIONS", "KERNELS_FILE", "InductorEngine", "InductorSlot", "artifact_bytes",
           "bucket_for", "graph_buckets", "probe_weights", "refit_check", "warmup_batches", "weight_problems"]
