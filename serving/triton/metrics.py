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

    def value(self) -> float:
        return float(self._metric.value())


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
        """Take a gauge series off Triton's endpoint (the live-version gauge, once another version is live).

        The stub's ``MetricFamily`` holds every ``Metric`` it made until the family itself is deleted, which
        deletes them all (python_backend's ``metric_family.cc``); dropping one ``Metric`` takes nothing off.
        So the family is rebuilt: its other series are read, the family deleted, and they are made again
        with their values. Kept instead, every version ever live would stay on the endpoint at 0.
        """
        if definition.kind != "gauge":
            raise ValueError(f"{definition.name}: only gauge series can be removed (a {definition.kind}'s "
                             "value cannot be restored when its family is rebuilt)")
        key = (definition.name, tuple(sorted({**self.const_labels, **labels}.items())))
        with self._lock:
            if key not in self._series:
                return
            others = {k: s.value() for k, s in self._series.items() if k[0] == definition.name and k != key}
            for k in [k for k in self._series if k[0] == definition.name]:
                del self._series[k]
            self._families.pop(definition.name, None)  # the last reference: the family and its series go
            for k, value in others.items():
                metric = self._family(definition).Metric(labels=dict(k[1]))
                series = self._series[k] = _Series(metric)
                series.set(value)

    def close(self) -> None:
        """Delete series before their families (Triton's required order)."""
        with self._lock:
            self._series.clear()
            self._families.clear()
