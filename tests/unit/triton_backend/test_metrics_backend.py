"""serving.triton.metrics: hotswap's series through the Python stub's MetricFamily; an old weights version leaves
Triton's endpoint instead of staying there at 0 (one series per version ever live grows without end)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.metrics import REFITS, WEIGHTS_INFO, HotswapMetrics
from serving.triton.metrics import TritonMetricsBackend


class FakeStubMetrics:
    """Stands in for the Python stub's ``pb_utils.MetricFamily`` / ``Metric`` (which need a running stub), as
    python_backend's ``metric_family.cc`` and ``metric.cc`` behave: a family keeps every Metric it made until
    the family itself is deleted, which deletes them all; dropping a Python Metric takes nothing off the endpoint.
    ``endpoint`` is what Triton's /metrics shows: (family name, labels) -> value."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self) -> None:
        self.endpoint: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        stub = self

        class Metric:
            def __init__(self, family: str, labels: dict[str, str]) -> None:
                self.key = (family, tuple(sorted(labels.items())))
                stub.endpoint.setdefault(self.key, 0.0)

            def set(self, value: float) -> None:
                stub.endpoint[self.key] = value

            def increment(self, value: float) -> None:
                stub.endpoint[self.key] += value

            def observe(self, value: float) -> None:
                stub.endpoint[self.key] += value

            def value(self) -> float:
                return stub.endpoint[self.key]

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name = name
                self.made: list[Metric] = []  # the stub's metric_map_

            def Metric(self, labels: dict[str, str], buckets: Any = None) -> Metric:  # noqa: N802 - pb_utils' name
                m = Metric(self.name, labels)
                self.made.append(m)
                return m

            def __del__(self) -> None:
                for m in self.made:
                    stub.endpoint.pop(m.key, None)

        self.MetricFamily = MetricFamily

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.endpoint.items() if n == name}


def test_only_the_live_version_stays_on_the_endpoint() -> None:
    pb = FakeStubMetrics()
    backend = TritonMetricsBackend(pb, {"model": "m", "instance": "m_0_0"})
    metrics = HotswapMetrics(backend)
    metrics.prime()
    before = len(pb.endpoint)
    for i in range(50):
        metrics.set_live_version(f"v{i}", 1000.0 + i)
    live = pb.series("hotswap_weights_info")
    assert live == {(("instance", "m_0_0"), ("model", "m"), ("version", "v49")): 1.0}
    assert len(pb.endpoint) == before + 2  # the live version and the last success time, nothing per version
    metrics.count_refit("success")
    assert pb.series("hotswap_refits_total")[(("instance", "m_0_0"), ("model", "m"), ("outcome", "success"),
                                              ("reason", ""))] == 1.0


def test_removing_one_gauge_series_keeps_the_others_of_its_family_with_their_values() -> None:
    pb = FakeStubMetrics()
    backend = TritonMetricsBackend(pb, {"model": "m"})
    info = HotswapMetrics(backend)
    info.set_live_version("a", 1.0)
    backend.series(WEIGHTS_INFO, {"version": "b"}).set(0.5)
    backend.remove(WEIGHTS_INFO, {"version": "a"})
    assert pb.series("hotswap_weights_info") == {(("model", "m"), ("version", "b")): 0.5}
    backend.series(WEIGHTS_INFO, {"version": "b"}).set(1)  # the series still records after the rebuild
    assert pb.series("hotswap_weights_info") == {(("model", "m"), ("version", "b")): 1.0}
    backend.remove(WEIGHTS_INFO, {"version": "never"})  # nothing to remove: nothing changes
    assert len(pb.series("hotswap_weights_info")) == 1
    with pytest.raises(ValueError, match="only gauge series can be removed"):
        backend.remove(REFITS, {"outcome": "success", "reason": ""})
