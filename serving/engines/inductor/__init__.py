"""The Inductor engine: ``torch.compile`` with the weights as graph inputs, cached without them.

How the weights stay refittable
    The factory's module is compiled through a function ``call(module, *inputs)`` whose first
    argument is the module itself: Dynamo inlines built-in ``nn.Module``s and lifts every parameter
    and buffer it reads into a *graph input*, and ``freezing`` stays off
    (:data:`~serving.engines.inductor.compiler.INDUCTOR_OPTIONS`), so Inductor never folds a weight
    into a constant or inlines a small one into the code. Each slot owns a module (its own weight
    storage) and passes it in; a refit ``copy_()``s new values into that storage, which the compiled
    code reads on its next call. The build checks this empirically
    (:func:`~serving.engines.inductor.checks.refit_check`): after warm-up it refits the slot to
    different random weights and compares the compiled output with the eager module on the same
    weights; an engine that does not follow (a weight baked in) is refused, naming the tensors.

Shapes
    The batch dimension is dynamic in ``[1, max_batch]`` (``mark_dynamic``); Dynamo specializes
    batch 1, so the warm-up runs batch 1, 2 and ``max_batch``: two graphs cover every batch size and no
    request ever waits on a compile. Every engine compiles its own copy of ``call`` (a fresh code
    object), so Dynamo's in-memory cache never hands it another engine's graphs.

Cache entry (no weights)
    Compiling happens inside a private Inductor cache folder. After warm-up the entry stores the
    compiler's artifacts and the compiled kernels (:mod:`.entry`). A hit in a fresh process unpacks
    both into a new private folder and calls ``load_cache_artifacts`` before compiling, so Dynamo
    traces but Inductor neither generates nor compiles code.

One module per job: :mod:`.checks` (device, batch sizes, the refit check), :mod:`.entry` (the cache
entry), :mod:`.compiler` (the recipe of :func:`~serving.engines.cached_build.cached_build`: key, compile,
warm-up), :mod:`.slot` (:class:`InductorSlot`, CUDA graphs), :mod:`.engine` (:class:`InductorEngine`).
"""

from __future__ import annotations

from serving.engines.inductor.checks import bucket_for, graph_buckets, probe_weights, refit_check, warmup_batches
from serving.engines.inductor.engine import InductorEngine
from serving.engines.inductor.slot import InductorSlot

__all__ = ["InductorEngine", "InductorSlot", "bucket_for", "graph_buckets", "probe_weights", "refit_check",
           "warmup_batches"]
