"""Read hotswap's series back from a Prometheus text endpoint (Triton's /metrics)."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def scrape(url: str, timeout: float = 5.0) -> list[Sample]:
    """Every sample on the endpoint."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def select(samples: list[Sample], name: str, labels: Mapping[str, str] | None = None) -> list[Sample]:
    want = dict(labels or {})
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in want.items())]


def total(samples: list[Sample], name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the matching samples (0 when there are none)."""
    return sum(s.value for s in select(samples, name, labels))


def weights_versions(samples: list[Sample], model: str) -> dict[str, str]:
    """instance -> the weights version live there (hotswap_weights_info == 1)."""
    return {s.labels.get("instance", ""): s.labels["version"]
            for s in select(samples, "hotswap_weights_info", {"model": model}) if s.value == 1}
