"""An allocation that fails during a refit, said as what it is: which copy of the weights did not fit, where,
how large it is, and what to do. The live weights keep serving; the next version that fits goes live.

torch reports a full device as :class:`torch.OutOfMemoryError` and a failed host allocation as a
``RuntimeError`` from its CPU allocator ("can't allocate memory"); both
(:func:`~serving.errors.is_out_of_memory`) become :class:`~serving.errors.OutOfMemoryError` (reason
``out_of_memory``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from serving.errors import OutOfMemoryError, is_out_of_memory
from serving.specs import WeightSpec


def size_text(nbytes: int) -> str:
    """``2.15 GB``, ``40.9 MB``: the size in a message."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def weights_nbytes(specs: Mapping[str, WeightSpec]) -> int:
    """Bytes of one copy of an engine's weights."""
    return sum(s.nbytes for s in specs.values())


@contextlib.contextmanager
def allocating(what: str, where: torch.device | str, nbytes: int, fix: str) -> Iterator[None]:
    """Turn an allocation refused in the block into :class:`OutOfMemoryError` naming ``what`` (and its
    ``nbytes``), ``where``, torch's own words and ``fix``."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OutOfMemoryError(f"{where}: out of memory allocating {what} ({size_text(nbytes)}): {said}; the "
                               f"live weights keep serving. {fix}") from e
