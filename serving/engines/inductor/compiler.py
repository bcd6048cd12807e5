"""How an Inductor engine is built: its cache key, the compile and warm-up in a private Inductor cache (with a
cache entry's artifacts loaded first on a hit), the refit check, and what is stored (the recipe of
:func:`~serving.engines.cached_build.cached_build`)."""

from __future__ import annotations

import os
import time
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.cache import CacheEntry, cache_key_fields, graph_fingerprint
from serving.engines.cached_build import EntryUnfit, Made, Recipe, host_cpu_fields
from serving.engines.export import make_module, nonpersistent_buffers
from serving.engines.inductor import entry as inductor_entry
from serving.engines.inductor.checks import cuda_graphs_of, refit_check, warmup_batches
from serving.engines.inductor.slot import InductorSlot
from serving.errors import CacheError
from serving.specs import BuildSpec, WeightSpec, specs_with_ties

#: Inductor config of every build (part of the cache key), set for the compile and warm-up.
#: ``freezing`` would turn the weights into constants of the compiled code (folded, packed,
#: inlined: ``copy_()`` into the weights then no longer changes the outputs): never.
INDUCTOR_OPTIONS: dict[str, bool] = {"freezing": False}
#: the private Inductor cache folder, inside the engine's work folder
COMPILE_DIR = "inductor"
_names = iter(range(1 << 62))


@dataclass(frozen=True)
class InductorParts:
    """What an Inductor engine is made of: the compiled code, the weight list, the non-persistent buffers (on the
    CPU), the warmed-up slot (the engine's first slot), and for the cache entry of a miss the artifacts and the
    private Inductor cache folder the kernels were compiled into."""

    fn: Callable[..., Any]
    specs: Mapping[str, WeightSpec]
    kept: Mapping[str, torch.Tensor]
    spare: InductorSlot
    artifacts: bytes | None
    compile_dir: Path


class InductorRecipe(Recipe[InductorParts]):
    """The Inductor build of ``spec`` on ``device``."""

    kind = "inductor"
    label = "Inductor engine"

    def __init__(self, spec: BuildSpec, device: torch.device) -> None:
        super().__init__(spec)
        self.device = device
        self.cuda_graphs = cuda_graphs_of(spec)
        self._module: torch.nn.Module | None = None

    def key_fields(self) -> dict[str, object]:
        """The strict cache key: architecture, inputs, batch range, dtype, torch, device, options."""
        module = make_module(self.spec, self.device, meta=True)
        graph = graph_fingerprint(module, self.spec.factory, self.spec.kwargs())
        extra: dict[str, object] = {"warmup_batches": list(warmup_batches(self.spec.max_batch)),
                                    "cuda_graphs": self.cuda_graphs}
        if self.device.type == "cpu":
            extra["host_cpu"] = host_cpu_fields()  # C++ kernels are built with -march=native
        else:
            try:
                import triton

                extra["triton"] = str(triton.__version__)
            except ImportError:
                extra["triton"] = None
        return cache_key_fields(engine=self.kind, graph=graph, spec=self.spec, build_flags=INDUCTOR_OPTIONS,
                                device=self.device, extra=extra)

    def copy_out(self, cached: CacheEntry, workdir: Path) -> Mapping[str, object]:
        return inductor_entry.copy_out(cached, workdir, _compile_dir(workdir))

    def from_entry(self, meta: Mapping[str, object], workdir: Path) -> Made[InductorParts]:
        module, specs = self._module_and_specs()
        problems = inductor_entry.entry_problems(meta, specs)
        if problems:
            raise EntryUnfit(problems)
        artifacts = workdir / inductor_entry.ARTIFACTS_FILE
        data = artifacts.read_bytes()
        artifacts.unlink()
        parts, _, (hits, misses) = self._compile(module, specs, _compile_dir(workdir), data)
        return Made(parts, note=f"{hits} graph(s) from it, {misses} compiled", kept=_why(parts.kept))

    def compile(self, workdir: Path) -> Made[InductorParts]:
        module, specs = self._module_and_specs()
        parts, seconds, _ = self._compile(module, specs, _compile_dir(workdir), None)
        return Made(parts, note=f"compiled and warmed up in {seconds:.1f}s", kept=_why(parts.kept))

    def entry(self, made: Made[InductorParts], staging: Path) -> tuple[dict[str, Path], dict[str, object]]:
        if made.parts.artifacts is None:
            raise CacheError("torch produced no cache artifacts (are Inductor's caches disabled, e.g. "
                             "TORCHINDUCTOR_FORCE_DISABLE_CACHES?)")
        files = {inductor_entry.ARTIFACTS_FILE: staging / inductor_entry.ARTIFACTS_FILE,
                 inductor_entry.KERNELS_FILE: staging / inductor_entry.KERNELS_FILE}
        files[inductor_entry.ARTIFACTS_FILE].write_bytes(made.parts.artifacts)
        n = inductor_entry.pack_kernels(made.parts.compile_dir, files[inductor_entry.KERNELS_FILE])
        return files, inductor_entry.entry_meta(made.parts.specs, n)

    def _module_and_specs(self) -> tuple[torch.nn.Module, dict[str, WeightSpec]]:
        """The factory's module (made once) and its weights: tied parameters are one weight (the other names its
        aliases); non-persistent buffers are not weights, they stay in the module."""
        if self._module is None:
            self._module = make_module(self.spec, self.device)
        return self._module, specs_with_ties(self._module.state_dict(keep_vars=True))

    def _compile(self, module: torch.nn.Module, specs: Mapping[str, WeightSpec], compile_dir: Path,
                 artifacts: bytes | None) -> tuple[InductorParts, float, tuple[int, int]]:
        """Compile and warm up a slot of ``module`` in ``compile_dir`` (loading ``artifacts`` first when given),
        check it follows refits, capture its CUDA graphs; (parts, seconds, (graphs from the cache, compiled))."""
        from torch.compiler._cache import CacheArtifactManager

        state = {k: v.detach() for k, v in module.state_dict().items() if k in specs}
        before = _inductor_counters()
        started = time.perf_counter()
        # the global config, not torch.compile(options=...): with torch 2.13, freezing set in options is not
        # applied (compile_fx reads torch._inductor.config.freezing, torch/_inductor/compile_fx.py), so a user's
        # TORCHINDUCTOR_FREEZING=1 would still bake the weights in
        with _private_inductor_cache(compile_dir), torch._inductor.config.patch(_build_config()):
            CacheArtifactManager.clear()  # what is saved below is this build's, nothing older
            if artifacts is not None:
                torch.compiler.load_cache_artifacts(artifacts)
            fn = torch.compile(_entry_point(), backend="inductor")
            slot = InductorSlot(self.spec, self.device, fn, module, specs, cuda_graphs=False)
            slot.refit(state)
            slot.warm_up()
            refit_check(slot, self.spec, state)
            slot.reset()  # holds probe weights now: it must be refitted before it serves
            saved = torch.compiler.save_cache_artifacts() if artifacts is None else None
        seconds = time.perf_counter() - started
        counts = {k: v - before.get(k, 0) for k, v in _inductor_counters().items()}
        if self.cuda_graphs:
            slot.capture_graphs()
        kept = {n: t.cpu() for n, t in nonpersistent_buffers(module).items()}
        parts = InductorParts(fn, specs, kept, slot, saved[0] if saved is not None else None, compile_dir)
        return parts, seconds, (counts.get("fxgraph_cache_hit", 0), counts.get("fxgraph_cache_miss", 0))


def _compile_dir(workdir: Path) -> Path:
    folder = workdir / COMPILE_DIR
    folder.mkdir(exist_ok=True)
    return folder


def _why(kept: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return dict.fromkeys(kept, "non-persistent buffer")


def _entry_point() -> Callable[..., Any]:
    """A fresh ``call(module, *inputs)``: its own code object, so its own Dynamo cache (no engine is ever handed
    another engine's graphs)."""

    def call(module: torch.nn.Module, *inputs: torch.Tensor) -> Any:
        return module(*inputs)

    name = f"hotswap_inductor_{next(_names)}"
    code = call.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=name)
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


def _build_config() -> dict[str, bool]:
    """:data:`INDUCTOR_OPTIONS`, and compile workers without an idle timer: its thread would outlive
    :func:`stop_compile_workers` by up to a minute (torch 2.13 ``quiesce_async_compile_pool``; the timer of
    ``torch/_inductor/compile_worker/timer.py`` only checks for exit between long sleeps)."""
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
    # the thread pool is not in the set above (torch 2.13, torch/_inductor/async_compile.py)
    pool = async_compile.AsyncCompile.pool
    if pool.cache_info().currsize:
        pool().shutdown(wait=True)
        pool.cache_clear()


__all__ = ["COMPILE_DIR", "INDUCTOR_OPTIONS", "InductorParts", "InductorRecipe", "stop_compile_workers"]
