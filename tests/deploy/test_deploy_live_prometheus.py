"""The rules and the dashboard against a REAL Prometheus server (Debian's binary) scraping a stand-in
for Triton's metrics endpoint: serving.metrics exporting with Triton's labels (model, instance) plus
nv_inference_* counters as Triton writes them. tests/integration/test_prometheus.py does the same
against the real Triton."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import promkit
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.metrics import STAGES, HotswapMetrics, prometheus_metrics


class FakeTriton:
    """/metrics on 127.0.0.1: the registry's text plus request counters that grow with time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.started = time.monotonic()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = generate_latest(fake.registry) + fake.triton_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-triton", daemon=True)
        self.thread.start()

    def triton_text(self) -> str:
        n = int((time.monotonic() - self.started) * 20)  # 20 requests/s
        labels = 'model="tiny_cnn",version="1"'
        lines = []
        for name, value in (("nv_inference_request_success", n), ("nv_inference_request_failure", 0),
                            ("nv_inference_count", n), ("nv_inference_exec_count", n),
                            ("nv_inference_request_duration_us", n * 1500),
                            ("nv_inference_queue_duration_us", n * 100)):
            lines += [f"# TYPE {name} counter", f"{name}{{{labels}}} {value}"]
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake_triton() -> Iterator[tuple[FakeTriton, HotswapMetrics]]:
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry, {"model": "tiny_cnn", "instance": "tiny_cnn_0_0"})
    metrics.set_live_version("v1", time.time())
    server = FakeTriton(registry)
    try:
        yield server, metrics
    finally:
        server.stop()


def _refit(metrics: HotswapMetrics, version: str) -> None:
    parts = [s for s in STAGES if s != "total"]
    stages = {s: 0.2 / len(parts) for s in parts}  # whatever the stages, a refit totals 0.2 s
    metrics.observe_stages({**stages, "total": 0.2})
    metrics.count_refit("success")
    metrics.set_live_version(version, time.time())
    metrics.cache_event("hit")
    metrics.cache_event("miss")
    metrics.count_refit("rejected", "shape_mismatch")


def test_every_expression_evaluates_against_a_real_prometheus(
        tmp_path: Path, fake_triton: tuple[FakeTriton, HotswapMetrics]) -> None:
    server, metrics = fake_triton
    with promkit.PrometheusServer(promkit.scrape_config(f"127.0.0.1:{server.port}"), tmp_path) as prom:
        prom.wait_scrapes(2)
        _refit(metrics, "v2")  # creates the histogram and counter series
        prom.wait_scrapes(2)
        _refit(metrics, "v3")  # grows them: rate()/increase() see this refit
        prom.wait_scrapes(3)

        # the relabelling: Triton's `instance` label arrives as model_instance, the target keeps `instance`
        (live,) = prom.vector("hotswap_weights_info == 1")
        assert live["metric"]["version"] == "v3"
        assert live["metric"]["model_instance"] == "tiny_cnn_0_0"
        assert live["metric"]["instance"] == f"127.0.0.1:{server.port}"
        assert "exported_instance" not in live["metric"]

        p99 = prom.wait(lambda: promkit.finite_values(prom.vector(
            'model_stage:hotswap_refit_duration_seconds:p99_1h{model="tiny_cnn", stage="total"}')),
            30, "the refit p99 recording rule")
        assert 0.1 < p99[0] <= 0.25  # each refit's total is 0.2 s: the (0.1, 0.25] bucket

        assert prom.query("sum by (model (up)")["status"] == "error"  # refusals are seen as such
        results = promkit.evaluate_all(prom, promkit.all_expressions())
        assert len(results) == len(promkit.all_expressions())
        by_stage = [r for w, r in results.items() if "over the dashboard range" in w]
        assert by_stage and promkit.finite_values(by_stage[0]), "the dashboard's p99-by-stage query is empty"

        firing = prom.wait(lambda: [a for a in prom.alerts() if a["labels"]["alertname"] == "HotswapRefitRejected"
                                    and a["state"] == "firing"], 30, "HotswapRefitRejected to fire")
        assert firing[0]["labels"]["reason"] == "shape_mismatch"
        assert firing[0]["labels"]["model_instance"] == "tiny_cnn_0_0"
