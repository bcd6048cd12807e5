from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from serving.metrics import STAGES, prometheus_metrics


def test_live_version_gauge_follows_swaps_and_records_are_labelled() -> None:
    registry = CollectorRegistry()
    m = prometheus_metrics(registry, {"model": "m", "instance": "m_0"})
    m.set_live_version("v1", 100.0)
    m.set_live_version("v2", 200.0)
    assert registry.get_sample_value("hotswap_weights_info", {"model": "m", "instance": "m_0", "version": "v2"}) == 1
    assert registry.get_sample_value("hotswap_weights_info", {"model": "m", "instance": "m_0", "version": "v1"}) is None
    assert registry.get_sample_value("hotswap_last_refit_success_timestamp_seconds",
                                     {"model": "m", "instance": "m_0"}) == 200.0
    m.count_refit("rejected", "corrupt")
    m.observe_stages({"read": 0.5, "total": 1.0})
    m.cache_event("hit")
    labels = {"model": "m", "instance": "m_0"}
    rejected = {**labels, "outcome": "rejected", "reason": "corrupt"}
    assert registry.get_sample_value("hotswap_refits_total", rejected) == 1
    assert registry.get_sample_value("hotswap_refit_duration_seconds_sum", {**labels, "stage": "read"}) == 0.5
    assert registry.get_sample_value("hotswap_engine_cache_events_total", {**labels, "event": "hit"}) == 1


def test_prime_creates_zero_series() -> None:
    registry = CollectorRegistry()
    m = prometheus_metrics(registry)
    m.prime()
    for stage in STAGES:
        assert registry.get_sample_value("hotswap_refit_duration_seconds_count", {"stage": stage}) == 0
    assert registry.get_sample_value("hotswap_refits_total", {"outcome": "failed", "reason": ""}) == 0


def test_the_readme_quotes_the_stage_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    start = readme.index("| stage | what it times |")
    rows = []
    for line in readme[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows == [f"| `{name}` | {doc} |" for name, doc in STAGES.items()]
