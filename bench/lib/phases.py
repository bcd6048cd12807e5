"""Where requests slow down during a swap: a swap's timeline from the watcher's stages, and request
latencies grouped by the phase each request overlapped most."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.lib.stats import percentile

#: stages of the watcher's summary line, in the order they run
STAGE_ORDER = ("settle", "hash", "read", "validate", "merge", "prescan", "drain", "transfer", "refit", "verify",
               "swap")


def phases(swap: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """A swap's timeline, (phase, start, end) in monotonic seconds: the watcher's stages laid end to end from
    the rename, then until the first answer ("answer"), then the hash after going live ("hash_after"). Pure."""
    t = float(swap["rename_at"])
    stages = swap.get("stages_ms") or {}
    out = []
    for name in STAGE_ORDER:
        ms = stages.get(name)
        if ms:
            out.append((name, t, t + ms / 1e3))
            t += ms / 1e3
    first = float(swap["rename_at"]) + float(swap["publish_to_first_response_s"])
    if first > t:
        out.append(("answer", t, first))
    if swap.get("hashed_after_s") is not None:
        out.append(("hash_after", first, first + float(swap["hashed_after_s"])))
    return out


def latency_by_phase(samples: list[tuple[float, float]], timelines: list[list[tuple[str, float, float]]],
                     ) -> dict[str, dict[str, float]]:
    """Request latencies (ms) grouped by the swap phase they overlapped most ("steady": none): count,
    p50, p99 and max of each group. Pure."""
    spans = sorted((a, b, name) for tl in timelines for name, a, b in tl)
    groups: dict[str, list[float]] = {}
    for start, latency in samples:
        end = start + latency
        best, overlap = "steady", 0.0
        for a, b, name in spans:
            if a > end:
                break
            o = min(b, end) - max(a, start)
            if o > overlap:
                best, overlap = name, o
        groups.setdefault(best, []).append(latency * 1e3)
    return {name: {"requests": len(values), "p50": percentile(values, 50) or 0.0,
                   "p99": percentile(values, 99) or 0.0, "max": max(values)}
            for name, values in groups.items()}
