"""Building a stripped, refittable engine with Torch-TensorRT, and deriving its exact weight map.

The model is exported with a dynamic batch dimension (:mod:`serving.engines.export`) and converted
as one whole graph by Torch-TensorRT's ``convert_exported_program_to_serialized_trt_engine`` with
``immutable_weights=False`` (``BuilderFlag.REFIT``, never ``REFIT_IDENTICAL``) and
``strip_engine_weights=True`` (``BuilderFlag.STRIP_PLAN``), our cache plugged in as its
``custom_engine_cache`` (:mod:`.cache_bridge`). On a miss the weight map is derived from
Torch-TensorRT's own bookkeeping (:mod:`.mapping`) and verified against an independent random weight
set before the entry is stored. Torch-TensorRT calls follow its sources 2.10-2.14
(``py/torch_tensorrt/dynamo/``: ``_compiler.py``, ``_refit.py``, ``_engine_cache.py``,
``conversion/_conversion.py``, ``conversion/_TRTInterpreter.py``), imported inside the functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from serving.engines.export import export, make_module
from serving.engines.tensorrt import mapping as tm
from serving.engines.tensorrt.cache_bridge import CacheBridge, EngineCacheLike, make_torch_trt_cache, trt_key_fields
from serving.engines.tensorrt.environment import TrtEnvironment
from serving.engines.tensorrt.options import TrtBuildOptions
from serving.engines.tensorrt.runtime import engine_weight_names
from serving.errors import EngineBuildError, HotswapError
from serving.metrics import HotswapMetrics
from serving.specs import BuildSpec, WeightSpec, specs_with_ties


@dataclass(frozen=True)
class Built:
    """A stripped engine, its I/O names and weight map, and how the cache was involved ("hit"/"miss")."""

    serialized_engine: bytes
    input_names: list[str]
    output_names: list[str]
    weight_map: tm.WeightMap
    literals: Mapping[str, torch.Tensor]
    cache: str
    key: str | None


def build_stripped(spec: BuildSpec, device: torch.device, env: TrtEnvironment, options: TrtBuildOptions,
                   cache: EngineCacheLike | None, metrics: HotswapMetrics) -> Built:
    """The stripped engine of ``spec``: from the cache on a hit, else converted, mapped, verified and stored."""
    from torch_tensorrt.dynamo._compiler import convert_exported_program_to_serialized_trt_engine
    from torch_tensorrt.dynamo._engine_cache import BaseEngineCache

    module = make_module(spec, device)
    bridge = CacheBridge(cache, lambda h: trt_key_fields(h, env, spec, options), metrics)
    trt_inputs = _trt_inputs(spec)
    try:
        serialized = convert_exported_program_to_serialized_trt_engine(
            export(module, spec, device), arg_inputs=trt_inputs, device=device,
            custom_engine_cache=make_torch_trt_cache(bridge), **_compile_options(options))
    except HotswapError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        raise EngineBuildError(
            f"Torch-TensorRT could not convert {spec.factory} as one TensorRT engine ({type(e).__name__}: {e}; "
            f"cause: {type(cause).__name__}: {cause}). hotswap converts the whole graph; an operator "
            "without a TensorRT converter must be rewritten, or use engine 'aoti'.") from e
    if bridge.hit is not None:
        key, entry = bridge.hit
        blob, weight_map, literals, how = entry.blob, entry.weight_map, entry.literals, "hit"
    else:
        if bridge.staged is None:
            raise EngineBuildError("Torch-TensorRT did not pass the built engine to the cache (save was never "
                                   "called); is its refit feature available (ENABLED_FEATURES.refit)?")
        blob = bridge.staged[1]
        how, key = "miss", None
    # BaseEngineCache.unpack -> (serialized_engine, input_names, output_names, input_specs, settings,
    # requires_output_allocator[, requires_native_multidevice])  (dynamo/_engine_cache.py)
    unpacked = BaseEngineCache.unpack(blob)
    stripped, input_names, output_names, requires_output_allocator = (
        bytes(unpacked[0]), list(unpacked[1]), list(unpacked[2]), bool(unpacked[5]))
    if requires_output_allocator:
        raise EngineBuildError(f"{spec.factory} has data-dependent output shapes (needs an output allocator); "
                               "the tensorrt engine does not serve those")
    if bridge.hit is None:
        weight_map, literals = derive_and_verify(spec, device, options, stripped, trt_inputs)
        key = bridge.commit(weight_map, literals)
    del serialized
    return Built(stripped, input_names, output_names, weight_map, literals, how, key)


def derive_and_verify(spec: BuildSpec, device: torch.device, options: TrtBuildOptions, stripped: bytes,
                       trt_inputs: Sequence[Any]) -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
    """The exact weight map of a freshly built engine, checked against Torch-TensorRT for other weights."""
    settings = _settings(device, options)
    names = engine_weight_names(stripped)
    module = make_module(spec, device)
    specs = _read_sources(module)
    ep = export(module, spec, device)
    reads = graph_reads(ep)
    gm = _lower(ep, settings, annotate=list(specs))
    refit_map, attrs = _network_weights(gm, trt_inputs, settings)
    attr_tensors = [(t, tm.node_expr(n, specs)) for n, t in attrs if isinstance(t, torch.Tensor)]
    derivation = tm.derive_records(refit_map, names, attr_tensors, tm.batch_norm_nodes(gm, specs), specs)
    problems = list(derivation.problems)
    used = set().union(*(r.sources for r in derivation.records)) if derivation.records else set()
    baked = sorted((reads & set(specs)) - used)  # non-persistent buffers are not checkpoint tensors
    if baked:
        problems.append(f"the model reads {baked[:10]} but no refittable engine weight comes from them: "
                        "the engine would bake them in")
    build_sources = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    problems += tm.compare_records(derivation.records, build_sources, derivation.literals, refit_map)
    if not problems:
        # an independent weight set through Torch-TensorRT's own path must give what the records give
        random = tm.random_sources(specs, seed=options.verify_seed)
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if k in random:
                    v.copy_(random[k].to(v.device))
        gm2 = _lower(export(module, spec, device), settings, annotate=None)
        refit_map2, _ = _network_weights(gm2, trt_inputs, settings)
        problems += tm.compare_records(derivation.records, {**build_sources, **random}, derivation.literals,
                                       refit_map2)
    if problems:
        raise EngineBuildError(f"cannot map every refittable weight of the {spec.factory} engine to the "
                               "checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    # a tied parameter (one tensor, several state-dict names) is read under one name: its spec carries the
    # others as aliases, so a checkpoint may provide any of them
    sources = specs_with_ties(module.state_dict(), used)
    tied = {n for s in sources.values() for n in s.names}
    weight_map = tm.WeightMap(derivation.records, {k: sources[k] for k in sorted(sources)},
                              tuple(sorted(set(specs) - tied)), tuple(sorted(derivation.literals)))
    return weight_map, dict(derivation.literals)


# --------------------------------------------------------------------------- Torch-TensorRT calls
def _compile_options(options: TrtBuildOptions) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "immutable_weights": False,  # BuilderFlag.REFIT (_TRTInterpreter._populate_trt_builder_config)
        "refit_identical_engine_weights": False,  # never REFIT_IDENTICAL: other weights are undefined
        "strip_engine_weights": True,  # BuilderFlag.STRIP_PLAN
        "cache_built_engines": True,
        "reuse_cached_engines": True,
        "min_block_size": 1,
        "require_full_compilation": True,
        "offload_module_to_cpu": False,
    }
    if options.optimization_level is not None:
        opts["optimization_level"] = options.optimization_level
    if options.workspace_size:
        opts["workspace_size"] = options.workspace_size
    return opts


def _settings(device: torch.device, options: TrtBuildOptions) -> Any:
    """The ``CompilationSettings`` ``convert_exported_program_to_serialized_trt_engine`` builds from
    the same options (``dynamo/_compiler.py``)."""
    from torch_tensorrt.dynamo._settings import CompilationSettings
    from torch_tensorrt.dynamo.utils import to_torch_tensorrt_device

    return CompilationSettings(device=to_torch_tensorrt_device(device), **_compile_options(options))


def _trt_inputs(spec: BuildSpec) -> list[Any]:
    from torch_tensorrt._Input import Input

    opt = min(max(1, spec.max_batch // 2), spec.max_batch)
    return [Input(min_shape=(1, *s.shape), opt_shape=(opt, *s.shape),
                                 max_shape=(spec.max_batch, *s.shape), dtype=s.dtype) for s in spec.inputs]


def _lower(ep: torch.export.ExportedProgram, settings: Any, annotate: Sequence[str] | None) -> torch.fx.GraphModule:
    """The lowering of ``convert_exported_program_to_serialized_trt_engine`` (``dynamo/_compiler.py``):
    ``pre_export_lowering``, ``run_decompositions(get_decompositions(...))``, ``module()``,
    ``post_lowering``; with our annotation of folded constants before ``post_lowering``."""
    from torch_tensorrt.dynamo.lowering import post_lowering, pre_export_lowering
    from torch_tensorrt.dynamo.lowering._decompositions import get_decompositions

    # annotated "-> torch.fx.GraphModule" up to 2.13 but returns the ExportedProgram (2.14 fixes the hint)
    ep = cast(torch.export.ExportedProgram, pre_export_lowering(ep, settings))
    # get_decompositions' parameters differ between releases; they are all settings fields
    params = inspect.signature(get_decompositions).parameters
    decomp_kwargs = {p: getattr(settings, p) for p in params if hasattr(settings, p)}
    ep = ep.run_decompositions(get_decompositions(**decomp_kwargs))
    gm = ep.module()
    if annotate is not None:
        tm.annotate_constant_exprs(gm, annotate)
    lowered: torch.fx.GraphModule = post_lowering(gm, settings)
    return lowered


def _network_weights(gm: torch.fx.GraphModule, inputs: Sequence[Any], settings: Any
                     ) -> tuple[dict[str, torch.Tensor], list[tuple[Any, Any]]]:
    """Torch-TensorRT's weight bookkeeping for ``gm``, as ``construct_refit_mapping`` (``dynamo/_refit.py``)
    gets it: a ``TRTInterpreter``, ``_construct_trt_network_def()``, ``ctx.weight_refit_map``; plus the
    tensors its ``get_attr`` returned, for provenance by identity."""
    from torch_tensorrt.dynamo.conversion._conversion import infer_module_output_dtypes
    from torch_tensorrt.dynamo.conversion._TRTInterpreter import TRTInterpreter

    class RecordingInterpreter(TRTInterpreter):
        attrs: list[tuple[Any, Any]]

        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if n.op == "get_attr":
                self.attrs.append((n, result))
            return result

    interpreter = RecordingInterpreter(
        gm, inputs, output_dtypes=infer_module_output_dtypes(gm, truncate_double=settings.truncate_double),
        compilation_settings=settings)
    interpreter.attrs = []
    interpreter._construct_trt_network_def()
    return dict(interpreter.ctx.weight_refit_map), interpreter.attrs


def _read_sources(module: torch.nn.Module) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=False).items()}


def graph_reads(ep: torch.export.ExportedProgram) -> set[str]:
    """State-dict names the exported graph actually uses (a placeholder with users)."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return {lifted[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in lifted and n.users}


__all__ = ["Built", "build_stripped", "derive_and_verify", "graph_reads"]
