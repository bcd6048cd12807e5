"""The product as users meet it: a real Triton serving the example repository, weights hot-swapped."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from serving.triton.scrape import scrape, select, total

from .conftest import INPUTS, TritonFixture, infer, infer_versioned, random_checkpoint, reference_output

pytestmark = pytest.mark.integration

TOKENS = INPUTS["tiny_transformer"]


def assert_serves(triton: TritonFixture, model: str, seed: int) -> None:
    x = INPUTS[model]
    expected = reference_output(model, seed, x).numpy()
    np.testing.assert_allclose(infer(triton.http_url, model, x), expected, atol=1e-4, rtol=1e-4)


def test_ready_only_with_weights_and_serving_the_initial_checkpoint(triton_server: TritonFixture) -> None:
    """At startup (recorded by the fixture before any test published) each model served `initial`."""
    for model in ("tiny_transformer", "tiny_cnn"):
        assert triton_server.server.model_ready(model)
        versions = triton_server.startup_versions[model]
        assert versions and set(versions.values()) == {"initial"}, versions
        expected = reference_output(model, 0, INPUTS[model]).numpy()
        np.testing.assert_allclose(triton_server.startup_outputs[model], expected, atol=1e-4, rtol=1e-4)
    assert len(triton_server.startup_versions["tiny_cnn"]) == 2  # two instances, each its own process


def test_the_engine_compiled_in_another_process_is_a_hit_in_tritons_stub(triton_server: TritonFixture) -> None:
    """The cache key depends on the model, not on the process: the example transformer's engine, compiled by the
    test session into the cache the server starts from (tests/conftest.py), is loaded, not compiled again."""
    log = triton_server.server.log_tail(1_000_000)
    assert re.search(r"tiny_transformer: engine aoti ready in [\d.]+s \(cache hit", log), log[-3000:]


def test_http_and_grpc_agree(triton_server: TritonFixture) -> None:
    a = infer(triton_server.http_url, "tiny_transformer", TOKENS)
    b = infer(triton_server.grpc_url, "tiny_transformer", TOKENS, protocol="grpc")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 5)


@pytest.mark.parametrize("model", ["tiny_transformer", "tiny_cnn"])
def test_dropped_checkpoint_changes_outputs_on_every_instance(
        triton_server: TritonFixture, model: str, tmp_path: Path) -> None:
    src = random_checkpoint(model, seed=21, out=tmp_path / "v21.safetensors")
    t0 = time.monotonic()
    triton_server.publish(model, src)
    triton_server.wait_for_version(model, "v21", timeout=60)
    print(f"{model}: v21 live on every instance {time.monotonic() - t0:.2f}s after the rename")
    for _ in range(4):  # requests land on either instance
        assert_serves(triton_server, model, seed=21)
    x = INPUTS[model]
    for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
        _, versions = infer_versioned(url, model, x, protocol=protocol)
        assert versions == ["v21"] * x.shape[0], (protocol, versions)  # every row names the weights that computed it


def test_bad_file_changes_nothing_and_shows_in_metrics(triton_server: TritonFixture, tmp_path: Path) -> None:
    model = "tiny_transformer"
    good = random_checkpoint(model, seed=31, out=tmp_path / "v31.safetensors")
    triton_server.publish(model, good)
    triton_server.wait_for_version(model, "v31")
    before = total(scrape(triton_server.metrics_url), "hotswap_refits_total",
                   {"model": model, "outcome": "rejected"})
    bad = tmp_path / "v32.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    triton_server.publish(model, bad)
    deadline = time.monotonic() + 30
    rejected = before
    while time.monotonic() < deadline and rejected == before:
        time.sleep(0.2)
        rejected = total(scrape(triton_server.metrics_url), "hotswap_refits_total",
                         {"model": model, "outcome": "rejected"})
    assert rejected == before + 1
    assert set(triton_server.versions(model).values()) == {"v31"}
    assert_serves(triton_server, model, seed=31)


def test_metrics_parse_beside_tritons_own(triton_server: TritonFixture) -> None:
    samples = scrape(triton_server.metrics_url)
    names = {s.name for s in samples}
    assert any(n.startswith("nv_inference_request_success") for n in names)
    for needed in ("hotswap_refits_total", "hotswap_weights_info", "hotswap_refit_duration_seconds_bucket",
                   "hotswap_refit_duration_seconds_count", "hotswap_engine_cache_events_total"):
        assert needed in names, needed
    stages = {s.labels["stage"] for s in select(samples, "hotswap_refit_duration_seconds_count",
                                                {"model": "tiny_transformer"})}
    assert {"read", "validate", "transfer", "refit", "swap", "total"} <= stages
    for s in select(samples, "hotswap_weights_info"):
        assert {"model", "instance", "version"} <= set(s.labels)
    cache = select(samples, "hotswap_engine_cache_events_total", {"model": "tiny_transformer"})
    assert {s.labels["event"] for s in cache} & {"hit", "miss"}


def test_status_command_and_the_version_output_against_the_real_server(triton_server: TritonFixture) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "serving.cli", "status", "--metrics-url", triton_server.metrics_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("MODEL") and len(lines) == 1 + 3, out.stdout  # tiny_transformer x1, tiny_cnn x2
    for model in ("tiny_transformer", "tiny_cnn"):
        for instance, version in triton_server.versions(model).items():
            assert any(line.split()[:3] == [model, instance, version] for line in lines[1:]), out.stdout
    # Triton 2.51's Python backend takes no response parameters: the version travels as an output
    log = triton_server.server.log_tail(1_000_000)
    assert ("weights version on every response as output HOTSWAP_WEIGHTS_VERSION and output "
            "HOTSWAP_WEIGHTS_VERSION_UTF8") in log
    assert "response parameter hotswap_weights_version" not in log  # InferenceResponse(parameters=) -> TypeError
