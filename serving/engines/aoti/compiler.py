"""How an AOTI engine is built: its cache key, a cached package checked against the model, or an export and
an AOTInductor compile checked to leave every weight out of the code (the recipe of
:func:`~serving.engines.cached_build.cached_build`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.cache import CacheEntry, cache_key_fields, graph_fingerprint
from serving.engines.aoti import entry as aoti_entry
from serving.engines.aoti.checks import (
    cached_spec_problems,
    constant_problems,
    graph_tensor_usage,
    kept_tensors,
    package_problems,
    split_state,
    tensors_sha256,
)
from serving.engines.aoti.runner import Runner, load_runner
from serving.engines.aoti.slot import AOTISlot, first_refit_check
from serving.engines.cached_build import EntryUnfit, Made, Recipe, host_cpu_fields
from serving.engines.export import EXAMPLE_BATCH, export, make_module, nonpersistent_buffers
from serving.errors import EngineBuildError
from serving.specs import BuildSpec, WeightSpec

log = logging.getLogger(__name__)

#: Inductor settings of every build (part of the cache key)
INDUCTOR_CONFIGS: dict[str, object] = {
    # weights stay out of the .so: the package is code only, weights arrive by refit
    "aot_inductor.package_constants_in_so": False,
    # never inline small tensors (<= 8-element 1-D, 0-d; GraphLowering.can_inline_constant) into the code:
    # they would be baked in
    "always_keep_tensor_constants": True,
}
#: size-only settings, applied where this torch has them (torch 2.11 has no enable_line_tables)
OPTIONAL_INDUCTOR_CONFIGS: dict[str, object] = {
    # the -g1 line tables are most of a small model's .so and only serve profilers (docs/benchmarks.md)
    "aot_inductor.enable_line_tables": False,
}


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


@dataclass(frozen=True)
class AOTIParts:
    """What an AOTI engine is made of: its weight list, ignored names, kept tensors (and why), the package, and
    the slot the build checked (the engine's first slot)."""

    specs: Mapping[str, WeightSpec]
    ignored: frozenset[str]
    kept: Mapping[str, torch.Tensor]
    why: Mapping[str, str]
    package: Path
    spare: AOTISlot


def make_slot(runner: Runner, spec: BuildSpec, device: torch.device, specs: Mapping[str, WeightSpec],
              ignored: frozenset[str], kept: Mapping[str, torch.Tensor]) -> AOTISlot:
    """A slot of ``runner``. Of the kept tensors it registers those that are constants of the compiled model:
    Inductor may fold one into the code (e.g. an empty tensor the model concatenates to), and the runner refuses
    a constant it does not have."""
    fqns = set(runner.get_constant_fqns())
    constants = {n: t for n, t in kept.items() if n in fqns}
    return AOTISlot(runner, spec=spec, device=device, specs=specs, ignored=ignored, constants=constants)


class AOTIRecipe(Recipe[AOTIParts]):
    """The AOTI build of ``spec`` on ``device``; ``meta``: build the module for the key without its weights (a
    cache hit never needs them)."""

    kind = "aoti"
    label = "AOTI engine"

    def __init__(self, spec: BuildSpec, device: torch.device, *, meta: bool) -> None:
        super().__init__(spec)
        self.device = device
        self.module = make_module(spec, device, meta=meta)
        if any(b.is_meta for b in nonpersistent_buffers(self.module).values()):
            self.module = make_module(spec, device)  # their values are part of the engine (and of the key)

    def key_fields(self) -> dict[str, object]:
        extra: dict[str, object] = {"host_cpu": host_cpu_fields(), "example_batch": EXAMPLE_BATCH}
        nonpersistent = nonpersistent_buffers(self.module)
        if nonpersistent:
            extra["nonpersistent_sha256"] = tensors_sha256(nonpersistent)
        # the key names every setting asked for; which optional ones a torch applies follows from its version,
        # itself in the key (asking torch._inductor would import torch._dynamo, slowing every hit)
        flags = {**INDUCTOR_CONFIGS, **OPTIONAL_INDUCTOR_CONFIGS}
        graph = graph_fingerprint(self.module, self.spec.factory, self.spec.kwargs())
        return cache_key_fields(engine=self.kind, graph=graph, spec=self.spec, build_flags=flags, device=self.device,
                                extra=extra)

    def copy_out(self, cached: CacheEntry, workdir: Path) -> Mapping[str, object]:
        return aoti_entry.copy_out(cached, workdir)

    def from_entry(self, meta: Mapping[str, object], workdir: Path) -> Made[AOTIParts]:
        specs, ignored, why = aoti_entry.read_meta(meta)
        kept = aoti_entry.read_kept(workdir, self.device) if why else {}
        problems = cached_spec_problems(self.module.state_dict(), specs, ignored - set(why))
        if set(kept) != set(why):
            problems.append(f"kept tensors {sorted(why)} listed, {sorted(kept)} stored")
        if problems:
            raise EntryUnfit(problems)
        package = workdir / aoti_entry.PACKAGE_FILE
        try:
            runner = load_runner(package, self.device)
            problems = constant_problems(runner.get_constant_fqns(), specs, kept)
            if problems:
                raise EntryUnfit(problems)
            slot = make_slot(runner, self.spec, self.device, specs, ignored, kept)
            first_refit_check(slot)
        except EngineBuildError as e:
            raise EntryUnfit([str(e)]) from e
        return Made(AOTIParts(specs, ignored, kept, why, package, slot), kept=why)

    def compile(self, workdir: Path) -> Made[AOTIParts]:
        module = self.module
        if any(t.is_meta for t in module.state_dict().values()):
            module = make_module(self.spec, self.device)
        with torch.no_grad():
            ep = export(module, self.spec, self.device)
        specs, ignored, kept, why = self._split(ep, module.state_dict())
        aoti_entry.write_kept(kept, workdir)
        package = workdir / aoti_entry.PACKAGE_FILE
        t0 = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=inductor_configs())
        except Exception as e:
            raise EngineBuildError(f"AOTI engine: AOTInductor compile of {self.spec.factory} failed: {e}") from e
        compile_s = time.perf_counter() - t0
        runner = load_runner(package, self.device)
        fqns = runner.get_constant_fqns()
        problems = package_problems(package) + constant_problems(fqns, specs, kept)
        why = {n: w if n in fqns else f"{w}; folded into the compiled code" for n, w in why.items()}
        if problems:
            raise EngineBuildError(
                f"AOTI engine for {self.spec.factory}: {len(problems)} problem(s), refusing an engine with "
                "weights baked in:\n" + "\n".join(f"  - {p}" for p in problems))
        slot = make_slot(runner, self.spec, self.device, specs, ignored, kept)
        first_refit_check(slot)
        return Made(AOTIParts(specs, ignored, kept, why, package, slot), note=f"compiled in {compile_s:.1f}s", kept=why)

    def _split(self, ep: torch.export.ExportedProgram, state: Mapping[str, torch.Tensor]) -> tuple[
            dict[str, WeightSpec], frozenset[str], dict[str, torch.Tensor], dict[str, str]]:
        """(weight specs, ignored names, kept tensors on the device, why each is kept) of an exported program."""
        used, _ = graph_tensor_usage(ep)
        specs, ignored, problems = split_state(state, used)
        kept, why, kept_issues = kept_tensors(ep, state, used)
        problems += kept_issues
        if problems:
            raise EngineBuildError(f"AOTI engine for {self.spec.factory}: " + "; ".join(problems))
        for name, reason in why.items():
            log.info("AOTI engine for %s: keeping %r in the engine (%s; no checkpoint provides it; its value "
                     "is part of the cache key)", self.spec.factory, name, reason)
        return specs, ignored | frozenset(kept), {n: t.to(self.device) for n, t in kept.items()}, why

    def entry(self, made: Made[AOTIParts], staging: Path) -> tuple[dict[str, Path], dict[str, object]]:
        parts = made.parts
        files = {aoti_entry.PACKAGE_FILE: parts.package}
        if parts.kept:
            files[aoti_entry.KEPT_FILE] = parts.package.parent / aoti_entry.KEPT_FILE
        return files, aoti_entry.entry_meta(parts.specs, parts.ignored, parts.why)


__all__ = ["AOTIParts", "AOTIRecipe", "INDUCTOR_CONFIGS", "OPTIONAL_INDUCTOR_CONFIGS", "inductor_configs",
           "make_slot"]
