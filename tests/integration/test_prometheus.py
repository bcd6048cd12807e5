"""A REAL Prometheus server (Debian's `prometheus`) scrapes the real Triton of the integration tests
with deploy/prometheus's scrape job and rules; every PromQL expression of the rules and of the
Grafana dashboard must evaluate without error, and the refit latency quantile must be a number after
a swap. Everything binds to 127.0.0.1; Prometheus is stopped at the end."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
import promkit  # noqa: E402  (tests/deploy/promkit.py)

from .conftest import random_checkpoint  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "tiny_cnn"  # eager engine: its refits take milliseconds


def _triton(request: pytest.FixtureRequest) -> Any:
    try:
        return request.getfixturevalue("triton_server")
    except pytest.FixtureLookupError:
        pytest.skip("needs the session fixture `triton_server` (tests/integration/conftest.py)")


def _infer(http_url: str, n: int) -> None:
    """A few plain KServe-v2 JSON requests, so Triton's nv_inference_* series have traffic."""
    base = http_url if http_url.startswith("http") else f"http://{http_url}"
    body = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": [0.5] * (3 * 32 * 32)}]}).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{base}/v2/models/{MODEL}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200


@pytest.mark.requires_tool("prometheus")
def test_prometheus_scrapes_triton_and_every_expression_evaluates(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    triton = _triton(request)

    config = promkit.scrape_config(f"127.0.0.1:{triton.metrics_port}")
    with promkit.PrometheusServer(config, tmp_path / "prometheus") as prom:
        prom.wait_scrapes(2, timeout=60)
        _infer(triton.http_url, 5)
        # two swaps: the first may create the histogram series (its first value is invisible to
        # increase()), the second grows them
        for seed in (9101, 9102):
            version = f"prom{seed}"
            ckpt = random_checkpoint(MODEL, seed, tmp_path / f"{version}.safetensors")
            triton.publish(MODEL, ckpt)
            triton.wait_for_version(MODEL, version, timeout=120)
            prom.wait_scrapes(2, timeout=60)
            _infer(triton.http_url, 5)
        prom.wait_scrapes(3, timeout=60)

        live = prom.vector(f'hotswap_weights_info{{model="{MODEL}"}} == 1')
        assert live, "hotswap_weights_info is not scraped"
        assert {s["metric"]["version"] for s in live} == {"prom9102"}
        assert all(s["metric"].get("model_instance", "").startswith(f"{MODEL}_") for s in live), (
            "Triton's `instance` label must arrive as model_instance (metric_relabel_configs)")
        assert all("exported_instance" not in s["metric"] for s in live)

        p99 = prom.wait(lambda: promkit.finite_values(prom.vector(
            f'model_stage:hotswap_refit_duration_seconds:p99_1h{{model="{MODEL}", stage="total"}}')),
            60, "the refit p99 recording rule to be a number")
        assert 0 < p99[0] < 120

        expressions = promkit.all_expressions()
        results = promkit.evaluate_all(prom, expressions)
        assert len(results) == len(expressions)
        by_stage = [r for w, r in results.items() if "over the dashboard range" in w]
        assert by_stage and promkit.finite_values(by_stage[0]), "the dashboard's refit p99 by stage is empty"
        assert promkit.finite_values(prom.vector(f'model:nv_inference_request_success:rate1m{{model="{MODEL}"}}'))
