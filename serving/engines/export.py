"""What every engine does first: build the model module and ``torch.export`` it with a dynamic batch.

* :func:`make_module`: the factory's module in eval mode, in the spec's dtype, on the device (or on
  the meta device, when only its architecture is needed: no memory, no weight init);
* :func:`nonpersistent_buffers`: the module's buffers outside its state dict (not weights);
* :func:`example_inputs`: one batch of zeros per input (zeros are valid token ids too);
* :func:`input_problems`: a batch of inputs checked against the spec;
* :func:`export`: ``torch.export.export`` (non-strict) of those inputs, with the batch dimension
  dynamic in ``[1, max_batch]``; a failure is an :class:`~serving.errors.EngineBuildError`.

The export does not change the grad mode; an engine that wants the graph traced without autograd
calls :func:`export` under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from serving.errors import EngineBuildError
from serving.factory import build_module
from serving.specs import BuildSpec, dtype_name

log = logging.getLogger(__name__)

#: batch of the example inputs (1 would specialize the batch dimension); at most ``max_batch``
EXAMPLE_BATCH = 2


def make_module(spec: BuildSpec, device: torch.device, meta: bool = False) -> torch.nn.Module:
    """The factory's module in eval mode, its floating tensors in ``spec.dtype``, on ``device``.

    With ``meta`` it is built on the meta device instead (the architecture without memory or weight
    init: enough for a graph fingerprint); a factory that cannot build there (e.g. one that reads
    files) is built for real on ``device``.
    """
    if meta:
        try:
            with torch.device("meta"), _no_init():
                return build_module(spec.factory, spec.kwargs()).to(dtype=spec.dtype)
        except Exception as e:
            log.debug("factory %s cannot build on the meta device (%s); building on %s", spec.factory, e, device)
    return build_module(spec.factory, spec.kwargs()).to(device=device, dtype=spec.dtype)


def nonpersistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that its state dict leaves out (``register_buffer(..., persistent=False)``, e.g.
    transformers' ``position_ids``): no checkpoint carries them, so they are not weights."""
    persistent = set(module.state_dict())
    return {n: b.detach() for n, b in module.named_buffers() if n not in persistent}


def example_inputs(spec: BuildSpec, device: torch.device, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Zeros of each input's dtype and shape, ``batch`` rows (default :func:`example_batch`)."""
    n = example_batch(spec) if batch is None else batch
    return tuple(torch.zeros((n, *i.shape), dtype=i.dtype, device=device) for i in spec.inputs)


def example_batch(spec: BuildSpec) -> int:
    """:data:`EXAMPLE_BATCH`, or ``max_batch`` when that is smaller."""
    return min(EXAMPLE_BATCH, spec.max_batch)


def batch_dims(spec: BuildSpec) -> tuple[dict[int, Any], ...] | None:
    """``dynamic_shapes`` for ``torch.export``: dim 0 of every input is ``batch`` in ``[1, max_batch]``
    (``None`` when ``max_batch`` is 1: nothing is dynamic)."""
    if spec.max_batch <= 1:
        return None
    batch = torch.export.Dim("batch", min=1, max=spec.max_batch)
    return tuple({0: batch} for _ in spec.inputs)


def export(module: torch.nn.Module, spec: BuildSpec, device: torch.device) -> torch.export.ExportedProgram:
    """``module`` exported (non-strict) on :func:`example_inputs` with the batch dimension dynamic."""
    try:
        return torch.export.export(module, example_inputs(spec, device), dynamic_shapes=batch_dims(spec),
                                   strict=False)
    except Exception as e:
        raise EngineBuildError(f"torch.export of {spec.factory} failed ({type(e).__name__}: {e})") from e


def input_problems(spec: BuildSpec, inputs: Sequence[torch.Tensor]) -> list[str]:
    """What is wrong with a batch of inputs for ``spec`` (count, shapes, dtypes, batch size). Pure.

    Compiled code does not check shapes itself: a wrong shape would read out of bounds (AOTI) or
    trigger a recompile on the serving path (Inductor).
    """
    problems: list[str] = []
    if len(inputs) != len(spec.inputs):
        problems.append(f"{len(inputs)} input(s) given, expected {len(spec.inputs)} "
                        f"({', '.join(i.name for i in spec.inputs)})")
    batches = {int(x.shape[0]) if x.dim() else 0 for x in inputs}
    for x, s in zip(inputs, spec.inputs, strict=False):
        if tuple(x.shape[1:]) != s.shape or x.dtype != s.dtype:
            problems.append(f"input {s.name}: {dtype_name(x.dtype)}{list(x.shape)}, expected "
                            f"{dtype_name(s.dtype)}[batch, {', '.join(map(str, s.shape))}]")
    if len(batches) > 1:
        problems.append(f"inputs disagree on the batch size: {sorted(batches)}")
    elif batches and not 1 <= next(iter(batches)) <= spec.max_batch:
        problems.append(f"batch size {next(iter(batches))} outside 1..{spec.max_batch}")
    return problems


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initializers no-ops while a module is built on meta.

    On the meta device they would be dispatched to torch's Python reference kernels, whose first
    use imports torch._dynamo (a large part of a cache hit's start, see docs/benchmarks.md); meta tensors hold no
    values to initialize anyway.
    """
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved = {n: getattr(torch.nn.init, n) for n in names}

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for n in names:
            setattr(torch.nn.init, n, skip)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


__all__ = ["EXAMPLE_BATCH", "batch_dims", "example_batch", "example_inputs", "export", "input_problems", "make_module",
           "nonpersistent_buffers"]
