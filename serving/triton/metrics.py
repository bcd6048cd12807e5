"""Exports hotswap's metric definitions through Triton's own metrics endpoint (pb_utils.MetricFamily)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from serving.metrics import MetricDef, MetricHandle


class _Series:
    """Adapts a pb_utils Metric to the MetricHandle protocol."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric

    def inc(self, amount: float = 1.0) -> None:
        self._metric.increment(amount)

    def set(self, value: float) -> None:
        self._metric.set(value)

    def observe(self, value: float) -> None:
        self._metric.observe(value)


class TritonMetricsBackend:
    """A MetricsBackend on ``pb_utils.MetricFamily``; every series carries the constant labels.

    Families and series are kept referenced here for the model's lifetime: a Metric must not
    outlive its MetricFamily, and the watcher thread records into them at any time.
    """

    def __init__(self, pb_utils: Any, const_labels: Mapping[str, str]) -> None:
        self._pb = pb_utils
        self.const_labels = dict(const_labels)
        self._families: dict[str, Any] = {}
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], _Series] = {}
        self._lock = threading.Lock()

    def _family(self, d: MetricDef) -> Any:
        fam = self._families.get(d.name)
        if fam is None:
            kinds = {"counter": self._pb.MetricFamily.COUNTER, "gauge": self._pb.MetricFamily.GAUGE,
                     "histogram": self._pb.MetricFamily.HISTOGRAM}
            fam = self._pb.MetricFamily(name=d.name, description=d.documentation, kind=kinds[d.kind])
            self._families[d.name] = fam
        return fam

    def series(self, definition: MetricDef, labels: Mapping[str, str]) -> MetricHandle:
        merged = {**self.const_labels, **labels}
        key = (definition.name, tuple(sorted(merged.items())))
        with self._lock:
            s = self._series.get(key)
            if s is None:
                fam = self._family(definition)
                if definition.kind == "histogram":
                    metric = fam.Metric(labels=merged, buckets=list(definition.buckets))
                else:
                    metric = fam.Metric(labels=merged)
                s = self._series[key] = _Series(metric)
            return s

    def remove(self, definition: MetricDef, labels: Mapping[str, str]) -> None:
        """Set the series to 0 and keep it: dropping a pb_utils Metric does not take it off Triton's
        endpoint (seen with Triton 2.51), so an old weights version reads 0, the live one 1."""
        key = (definition.name, tuple(sorted({**self.const_labels, **labels}.items())))
        with self._lock:
            series = self._series.get(key)
        if series is not None:
            series.set(0)

    def close(self) -> None:
        """Delete series before their families (Triton's required order)."""
        with self._lock:
            self._series.clear()
            self._families.clear()
