"""The statistics every benchmark reports: one percentile and one median."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between the two nearest ranks
    (numpy's default, ``statistics.quantiles(method="inclusive")``); None for no values. Pure."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q}: must be between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Iterable[float]) -> float | None:
    """The median of ``values``; None for no values. Pure."""
    ordered = list(values)
    return statistics.median(ordered) if ordered else None
