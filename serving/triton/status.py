"""``hotswap status``: what each model instance serves, read from Triton's metrics endpoint.

Pure: :func:`status_rows` turns scraped samples into rows, :func:`render` into a table; the CLI only
scrapes and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from prometheus_client.samples import Sample

from serving.metrics import LAST_SUCCESS, REFITS, WATCHER_ERRORS, WEIGHTS_INFO


@dataclass(frozen=True)
class InstanceStatus:
    model: str
    instance: str
    version: str
    #: Unix time of the last successful refit (0: none since start)
    last_success: float
    rejected: int
    failed: int
    watcher_errors: int


def status_rows(samples: list[Sample]) -> list[InstanceStatus]:
    """One row per (model, instance) that reports hotswap metrics, sorted."""
    rows: dict[tuple[str, str], InstanceStatus] = {}
    for s in samples:
        key = (s.labels.get("model", ""), s.labels.get("instance", ""))
        if s.name not in (WEIGHTS_INFO.name, LAST_SUCCESS.name, REFITS.name, WATCHER_ERRORS.name):
            continue
        r = rows.get(key) or InstanceStatus(*key, "", 0.0, 0, 0, 0)
        if s.name == WEIGHTS_INFO.name and s.value == 1:
            r = replace(r, version=s.labels.get("version", ""))
        elif s.name == LAST_SUCCESS.name:
            r = replace(r, last_success=s.value)
        elif s.name == REFITS.name and s.labels.get("outcome") == "rejected":
            r = replace(r, rejected=r.rejected + int(s.value))
        elif s.name == REFITS.name and s.labels.get("outcome") == "failed":
            r = replace(r, failed=r.failed + int(s.value))
        elif s.name == WATCHER_ERRORS.name:
            r = replace(r, watcher_errors=int(s.value))
        rows[key] = r
    return [rows[k] for k in sorted(rows)]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render(rows: list[InstanceStatus], now: float) -> str:
    """A plain-text table for a terminal."""
    import time

    head = ("MODEL", "INSTANCE", "LIVE VERSION", "LAST REFIT", "REJECTED", "FAILED", "WATCHER ERRORS")
    body = [(r.model, r.instance, r.version or "-",
             "-" if not r.last_success else
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.last_success))} ({_age(now - r.last_success)})",
             str(r.rejected), str(r.failed), str(r.watcher_errors)) for r in rows]
    if not body:
        return "no hotswap models on this endpoint"
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))
