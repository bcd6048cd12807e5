"""The statistics the benchmarks report: a percentile, a median, and how fast a series grows (a least-squares
slope)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


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


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of ``ys`` against ``xs``; None for fewer than two distinct ``xs``. Pure."""
    if len(xs) != len(ys):
        raise ValueError(f"slope: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def growth_pct(xs: Sequence[float], ys: Sequence[float], per: float) -> float | None:
    """How fast ``ys`` grows: the least-squares slope over ``per`` units of ``xs``, in % of the mean of
    ``ys``. 0 for a series that is 0 throughout; None when there is no slope (fewer than two points) or a
    series around 0 changes (no level to compare with). Pure."""
    s = slope(xs, ys)
    if s is None:
        return None
    level = sum(ys) / len(ys)
    if level == 0:
        return 0.0 if all(y == 0 for y in ys) else None
    return 100.0 * s * per / abs(level)
