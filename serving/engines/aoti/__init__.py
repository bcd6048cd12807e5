"""The AOTI engine: AOTInductor packages compiled without weights, refitted in place.

The model is exported once (``torch.export`` with a dynamic batch) and compiled by AOTInductor into a
``.pt2`` package that holds code only: ``package_constants_in_so=False`` leaves the weights out,
``always_keep_tensor_constants=True`` stops Inductor from inlining small tensors into the code (every
0-d tensor and every 1-D tensor of at most 8 elements, ``GraphLowering.can_inline_constant``), which
would otherwise be baked in and never refit. The build checks both (no weight files in the package;
the compiled model's constants are exactly the state-dict tensors the graph reads, plus the tensors the
engine keeps) and refits one slot through serving's own call. The package goes to the stripped-engine
cache; a hit loads it without exporting or compiling.

One module per job:

* :mod:`.probe`: can this machine load a package at all (asked in a child process, the loader may crash);
* :mod:`.runner`: loading a package (the C++ loader, behind the probe);
* :mod:`.checks`: what the graph reads, what the engine keeps, what the package and a weight set must be (pure);
* :mod:`.entry`: the cache entry's files and metadata;
* :mod:`.compiler`: the recipe of :func:`~serving.engines.cached_build.cached_build`: key, hit, compile;
* :mod:`.slot`: :class:`AOTISlot`, a runner whose constants are the slot's own buffers;
* :mod:`.engine`: :class:`AOTIEngine`, which ties them together.
"""

from __future__ import annotations

from serving.engines.aoti.engine import AOTIEngine
from serving.engines.aoti.slot import AOTISlot

__all__ = ["AOTIEngine", "AOTISlot"]
