"""Grouping Triton requests into engine batches. Pure."""

from __future__ import annotations

from collections.abc import Sequence


def split_batches(sizes: Sequence[int], max_batch: int) -> list[list[int]]:
    """Group consecutive requests (by batch size) into runs of at most ``max_batch`` rows. Pure."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i, n in enumerate(sizes):
        if current and rows + n > max_batch:
            groups.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        groups.append(current)
    return groups
