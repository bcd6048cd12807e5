"""What the AOTI engine checks, as pure functions: which tensors the graph reads, what the engine keeps, that the
compiled package holds no weights and no baked-in tensor, and what a weight set must be for the runner."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from serving.specs import WeightSpec, dtype_name, specs_with_ties

#: the fix named when the compiled model needs a tensor the engine cannot hold
NOT_HELD_FIX = ("a tensor the model creates while it runs cannot be refitted or kept: switch that off in the factory "
                "(e.g. a transformers key/value cache: use_cache=False in the config), or use engine 'eager'")


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
                            f"of the exported program: the engine cannot hold it; {NOT_HELD_FIX}")
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


def constant_problems(constant_fqns: Iterable[str], weight_names: Iterable[str],
                      kept: Iterable[str] = ()) -> list[str]:
    """The compiled model's constants must be exactly the state-dict tensors the graph reads, plus tensors the
    engine keeps (:func:`kept_tensors`; Inductor may fold a kept one into the code: it is not a constant then)."""
    fqns, names = set(constant_fqns) - set(kept), set(weight_names)
    problems = [
        f"state-dict tensor {n!r} is read by the graph but is not a constant of the compiled model: "
        "it was baked into the code and a refit could never change it (Inductor inlines 0-d tensors and "
        "1-D tensors of <= 8 elements unless always_keep_tensor_constants=True)"
        for n in sorted(names - fqns)
    ]
    problems += [
        f"the compiled model has constant {n!r}, which is not a state-dict tensor the graph reads nor a tensor "
        f"the engine keeps: no checkpoint can provide it; {NOT_HELD_FIX}"
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


def runner_problems(device: torch.device) -> Callable[[str, torch.Tensor], list[str]]:
    """What the runner's buffers need of a tensor beyond :func:`~serving.engines.base.weight_problems`: the
    device's index too, and a compact tensor."""

    def problems(name: str, t: torch.Tensor) -> list[str]:
        out = []
        if t.device.type == device.type and device.index is not None and t.device.index != device.index:
            out.append(f"{name!r}: on {t.device}, expected {device} (call transfer() first)")
        if not is_compact(t):
            out.append(f"{name!r}: not contiguous or a view into a larger storage (call transfer() first)")
        return out

    return problems


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


__all__ = ["NOT_HELD_FIX", "cached_spec_problems", "constant_problems", "graph_tensor_usage", "is_compact",
           "kept_tensors", "package_problems", "runner_problems", "split_state", "tensors_sha256"]
