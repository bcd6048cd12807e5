"""An Inductor slot: a module of its own (its weight storage) run through the engine's compiled code.

A refit copies into the module's tensors in place; they never move, so compiled code and captured CUDA graphs
always read the slot's current weights. With ``cuda_graphs: true`` each slot captures one graph per batch bucket
(powers of two up to ``max_batch``, and ``max_batch``) against its own weight storage and static input buffers;
a request is padded to its bucket. Refits copy into that same storage and synchronize before returning, and the
refit coordinator only swaps to a slot after its refit: a graph never replays against a half-written slot.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from serving.engines.base import CopySlot
from serving.engines.export import input_problems
from serving.engines.inductor.checks import bucket_for, graph_buckets, random_inputs, warmup_batches
from serving.errors import ConfigError, NotReadyError
from serving.specs import BuildSpec, WeightSpec


class InductorSlot(CopySlot):
    """A module of its own (its weight storage) run through the engine's compiled code ``fn(module, *inputs)``."""

    def __init__(self, spec: BuildSpec, device: torch.device, fn: Callable[..., Any], module: torch.nn.Module,
                 specs: Mapping[str, WeightSpec], *, cuda_graphs: bool) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ConfigError("cuda_graphs: true needs a CUDA device")
        super().__init__(f"Inductor engine {spec.factory}", specs, device)
        self.spec = spec
        self.fn = fn
        module.requires_grad_(False)
        self.module = module
        self._tensors = {k: v.detach() for k, v in module.state_dict().items() if k in specs}
        self._graphs: _Graphs | None = None

    def buffers(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def installed(self, buffers: Mapping[str, torch.Tensor]) -> None:
        """On CUDA, wait for the copies: a slot is never run (or swapped in) half-written."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def warm_up(self) -> None:
        """Compile every graph serving will use: batch 1 and the dynamic batch (run at 2 and max)."""
        for n in warmup_batches(self.spec.max_batch):
            xs = random_inputs(self.spec, n, self.device, seed=n)
            if n > 1:
                for x in xs:
                    torch._dynamo.mark_dynamic(x, 0, min=1, max=self.spec.max_batch)
            self._call(xs)

    def capture_graphs(self) -> None:
        """Capture this slot's CUDA graphs (once; the compiled code must be warmed up)."""
        if self._graphs is None:
            self._graphs = _Graphs(self.spec, self.device, functools.partial(self._call),
                                   graph_buckets(self.spec.max_batch))

    def _call(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(pytree.tree_leaves(self.fn(self.module, *xs)))

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.ready:
            raise NotReadyError(f"Inductor engine {self.spec.factory}: this slot has no weights yet; refit it first")
        # a wrong shape would trigger a recompile on the serving path
        problems = input_problems(self.spec, inputs)
        if problems:
            raise ValueError("Inductor engine inputs: " + "; ".join(problems))
        # inference tensors (made under torch.inference_mode) would fail a guard and recompile
        xs = [x.to(self.device) for x in inputs]
        xs = [x.clone() if x.is_inference() else x for x in xs]
        if self._graphs is not None:
            return self._graphs.run(xs)
        return self._call(xs)

    def close(self) -> None:
        self.reset()
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


__all__ = ["InductorSlot"]
