"""The metrics of hotswap: one set of definitions, several exporters.

Definitions are data (:data:`DEFINITIONS`); :class:`HotswapMetrics` records through a
:class:`MetricsBackend`. :class:`PrometheusBackend` exports with ``prometheus_client`` into an
injected registry; the Triton exporter (``serving.triton.metrics``) reuses the same
definitions through ``pb_utils.MetricFamily``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: every stage a refit records (the ``stage`` label of ``hotswap_refit_duration_seconds``), roughly in
#: the order they run, with what it times; the same meaning on every path (double buffer or in place,
#: host or fast path). The README's table of stages is this table (a test compares them).
STAGES: Mapping[str, str] = MappingProxyType({
    "read": "finding the checkpoint and reading its headers and, on the host path, its tensors",
    "validate": "checking names, shapes and dtypes against the engine, casting, looking for NaN/Inf",
    "merge": "LoRA: merging the adapter into the pristine base weights (the watcher, before the refit)",
    "prescan": "in place, fast path: reading and checking the new checkpoint once, before requests are "
               "held (nothing is kept)",
    "drain": "waiting until no request runs on the slot about to be written: the standby (double "
             "buffer), or the live slot while new requests are held (in place)",
    "transfer": "bringing the new tensors to the engine's device (fast path: streaming the file into "
                "the slot's tensors; on the CPU, looking for NaN/Inf on the way)",
    "refit": "installing the transferred tensors into the slot",
    "verify": "the canary: running the refitted slot and checking its outputs",
    "swap": "making the slot serve: the pointer switch (double buffer), releasing the held requests "
            "(in place)",
    "pause": "how long new requests waited: the swap (double buffer), from holding to releasing them "
             "(in place)",
    "total": "the whole refit",
})

#: buckets for stage latencies, 100 us .. 2 min
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)


@dataclass(frozen=True)
class MetricDef:
    """A metric's name, kind, help text and labels (beyond the exporter's constant labels)."""

    name: str
    kind: str  # "counter", "gauge", "histogram"
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


REFIT_DURATION = MetricDef(
    "hotswap_refit_duration_seconds", "histogram",
    "Time spent in each stage of a weight refit (stage=total for the whole refit).",
    ("stage",), LATENCY_BUCKETS,
)
REFITS = MetricDef(
    "hotswap_refits_total", "counter",
    "Refit attempts by outcome (success, rejected, failed, rolled_back, noop, skipped) and reason.",
    ("outcome", "reason"),
)
WEIGHTS_INFO = MetricDef(
    "hotswap_weights_info", "gauge",
    "1 for the weights version that is live now (label version).",
    ("version",),
)
LAST_SUCCESS = MetricDef(
    "hotswap_last_refit_success_timestamp_seconds", "gauge",
    "Unix time of the last successful refit (or initial install).",
)
CACHE_EVENTS = MetricDef(
    "hotswap_engine_cache_events_total", "counter",
    "Stripped-engine cache events: hit, miss, store, corrupt, evict.",
    ("event",),
)
WATCHER_ERRORS = MetricDef(
    "hotswap_watcher_errors_total", "counter",
    "Errors caught in the weights-folder watcher or refit worker (they never stop it).",
)

DEFINITIONS: tuple[MetricDef, ...] = (
    REFIT_DURATION, REFITS, WEIGHTS_INFO, LAST_SUCCESS, CACHE_EVENTS, WATCHER_ERRORS,
)


class MetricHandle(Protocol):
    """One labelled series."""

    def inc(self, amount: float = 1.0) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, value: float) -> None: ...


class MetricsBackend(Protocol):
    """Creates series for a definition; ``remove`` drops one (used for the live-version gauge)."""

    def series(self, definition: MetricDef, labels: Mapping[str, str]) -> MetricHandle: ...
    def remove(self, definition: MetricDef, labels: Mapping[str, str]) -> None: ...


class PrometheusBackend:
    """Exports with ``prometheus_client`` into the given registry (never the global one by default)."""

    def __init__(self, registry: CollectorRegistry, const_labels: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.const_labels = dict(const_labels or {})
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()

    def _family(self, d: MetricDef) -> Counter | Gauge | Histogram:
        with self._lock:
            fam = self._families.get(d.name)
            if fam is None:
                names = [*self.const_labels, *d.labels]
                if d.kind == "counter":
                    fam = Counter(d.name.removesuffix("_total"), d.documentation, names, registry=self.registry)
                elif d.kind == "gauge":
                    fam = Gauge(d.name, d.documentation, names, registry=self.registry)
                elif d.kind == "histogram":
                    fam = Histogram(d.name, d.documentation, names, registry=self.registry, buckets=d.buckets)
                else:
                    raise ValueError(f"unknown metric kind {d.kind!r} for {d.name}")
                self._families[d.name] = fam
            return fam

    def _values(self, d: MetricDef, labels: Mapping[str, str]) -> list[str]:
        merged = {**self.const_labels, **labels}
        return [merged[k] for k in [*self.const_labels, *d.labels]]

    def series(self, definition: MetricDef, labels: Mapping[str, str]) -> MetricHandle:
        fam = self._family(definition)
        values = self._values(definition, labels)
        return fam.labels(*values) if values else fam  # type: ignore[return-value]

    def remove(self, definition: MetricDef, labels: Mapping[str, str]) -> None:
        fam = self._family(definition)
        try:
            fam.remove(*self._values(definition, labels))
        except KeyError:
            pass


class NullBackend:
    """Records nothing (for library use without metrics)."""

    class _Null:
        def inc(self, amount: float = 1.0) -> None: ...
        def set(self, value: float) -> None: ...
        def observe(self, value: float) -> None: ...

    def series(self, definition: MetricDef, labels: Mapping[str, str]) -> MetricHandle:
        return self._Null()

    def remove(self, definition: MetricDef, labels: Mapping[str, str]) -> None:
        return None


class HotswapMetrics:
    """What the rest of hotswap records; one instance per engine (per Triton model instance)."""

    def __init__(self, backend: MetricsBackend | None = None) -> None:
        self.backend: MetricsBackend = backend if backend is not None else NullBackend()
        self._live: str | None = None
        self._lock = threading.Lock()

    def prime(self) -> None:
        """Create the stage histograms and outcome counters at zero, so the first refit is a visible
        increase for ``rate()``/``increase()`` (a series born with its first event is not)."""
        for stage in STAGES:
            self.backend.series(REFIT_DURATION, {"stage": stage})
        for outcome in ("success", "rejected", "failed", "rolled_back"):
            self.backend.series(REFITS, {"outcome": outcome, "reason": ""}).inc(0)
        self.backend.series(WATCHER_ERRORS, {}).inc(0)

    def observe_stages(self, stages: Mapping[str, float]) -> None:
        for stage, seconds in stages.items():
            self.backend.series(REFIT_DURATION, {"stage": stage}).observe(seconds)

    def count_refit(self, outcome: str, reason: str = "", amount: int = 1) -> None:
        self.backend.series(REFITS, {"outcome": outcome, "reason": reason}).inc(amount)

    def set_live_version(self, version: str, when: float) -> None:
        with self._lock:
            if self._live is not None and self._live != version:
                self.backend.remove(WEIGHTS_INFO, {"version": self._live})
            self._live = version
            self.backend.series(WEIGHTS_INFO, {"version": version}).set(1)
            self.backend.series(LAST_SUCCESS, {}).set(when)

    def cache_event(self, event: str) -> None:
        self.backend.series(CACHE_EVENTS, {"event": event}).inc()

    def watcher_error(self) -> None:
        self.backend.series(WATCHER_ERRORS, {}).inc()


def prometheus_metrics(
    registry: CollectorRegistry, const_labels: Mapping[str, str] | None = None
) -> HotswapMetrics:
    """:class:`HotswapMetrics` exporting into ``registry``."""
    return HotswapMetrics(PrometheusBackend(registry, const_labels))


def metric_names(defs: Sequence[MetricDef] = DEFINITIONS) -> list[str]:
    """Names as they appear on ``/metrics`` (histograms add _bucket/_sum/_count)."""
    return [d.name for d in defs]
