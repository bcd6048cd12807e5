"""Clients send requests continuously while versions are swapped: no error, no torn read, and every
response names the weights that computed it.

The model is sized so that a refit takes far longer than a request (a ~100 MB transformer on the eager
engine: its copies take hundreds of milliseconds on a CPU), and each request pauses halfway through the
model (a factory module next to model.py adds a 0.5 s pause before the middle block), so requests are in
flight while the next refit begins: refitting the live copy, skipping the drain of the standby, or not
holding requests during an in-place refit each show up as responses that match no single version, or
not the version they name.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.lib.swapload import ClientPool, classify, response_version, run_swap_load
from serving.examples import TRANSFORMER
from serving.factory import build_module
from serving.publish import publish, publish_tensors
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess
from serving.weights.random_state import random_state_dict

from .conftest import REPOSITORY

pytestmark = pytest.mark.integration

#: the test's factory, placed next to model.py (Triton puts the model's folder on sys.path)
SLOW_FACTORY = '''"""The example transformer, pausing halfway through each forward (requests stay in flight)."""

import time

from serving.examples.transformer import tiny_transformer


def slow_transformer(pause_s: float = 0.5, **kwargs):
    module = tiny_transformer(**kwargs)
    module.blocks[len(module.blocks) // 2].register_forward_pre_hook(lambda *_: time.sleep(pause_s))
    return module
'''
#: about 100 MB of float32 weights
BIG = {"vocab": 1000, "seq_len": 16, "d_model": 512, "n_heads": 8, "d_ff": 2048, "n_layers": 8, "n_classes": 5}
STRATEGIES = ("double_buffer", "in_place")
SEEDS = (200, 201, 202, 203, 204, 205, 206)
X = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(5))


def test_classify_spots_a_mixed_output() -> None:
    expected = {"a": np.zeros(3), "b": np.ones(3)}
    assert classify(np.zeros(3), expected, 1e-4) == ["a"]
    assert classify(np.array([0.0, 1.0, 0.0]), expected, 1e-4) == []


def test_a_response_naming_another_version_than_its_output_is_torn() -> None:
    expected = {"a": np.zeros(3), "b": np.ones(3)}
    answers = iter([(np.zeros(3), "a"), (np.zeros(3), "b")] * 1000)
    lock = threading.Lock()

    def infer() -> tuple[np.ndarray, str]:
        with lock:
            return next(answers)

    result = run_swap_load(infer, expected, lambda v: None, [], clients=1, warmup_s=0.05, cooldown_s=0.0,
                           max_requests=10)
    assert result.torn == 5 and result.versions_seen == {"a": 5}


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonProcess, Path, dict[str, Any]]]:
    """Its own Triton: the ~100 MB transformer on the eager engine, once per refit strategy."""
    work = tmp_path_factory.mktemp("zero-downtime")
    repo, weights = work / "repository", work / "weights"
    module = build_module(TRANSFORMER, BIG)
    states = {f"z{s}": random_state_dict(module, s) for s in SEEDS}
    sources = work / "versions"
    for version, sd in states.items():
        publish_tensors(sd, sources, version=version)  # written once; published by hard links, in milliseconds
    expected = {}
    for version, sd in states.items():
        module.load_state_dict(sd)
        with torch.inference_mode():
            expected[version] = module(X).numpy()
    config = (REPOSITORY / "tiny_transformer" / "config.pbtxt").read_text()
    kwargs = json.dumps(BIG).replace('"', '\\"')
    for strategy in STRATEGIES:
        name = f"big_{strategy}"
        shutil.copytree(REPOSITORY / "tiny_transformer" / "1", repo / name / "1")
        (repo / name / "1" / "slow_factory.py").write_text(SLOW_FACTORY)
        text = config.replace('name: "tiny_transformer"', f'name: "{name}"')
        text = text.replace("serving.examples.transformer:tiny_transformer", "slow_factory:slow_transformer")
        text = text.replace('string_value: "aoti"', 'string_value: "eager"')
        text = text.replace('string_value: "double_buffer"', f'string_value: "{strategy}"')
        text = text.replace('string_value: "reference"', 'string_value: "finite"')
        text += f'parameters {{ key: "factory_kwargs", value: {{ string_value: "{kwargs}" }} }}\n'
        (repo / name / "config.pbtxt").write_text(text)
        publish_tensors(states["z200"], weights / name, version="z200")
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights), HOTSWAP_CACHE_DIR=str(work / "cache"))
    server = TritonProcess(repo, work_dir=work / "run", env=env)
    server.start()
    try:
        server.wait_ready([f"big_{s}" for s in STRATEGIES], timeout=600)
        yield server, weights, {"sources": sources, "expected": expected}
    finally:
        server.stop()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_swaps_under_load_without_errors_or_torn_reads(
        big_server: tuple[TritonProcess, Path, dict[str, Any]], strategy: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server, weights, data = big_server
    model = f"big_{strategy}"
    expected: dict[str, np.ndarray] = data["expected"]
    counter = iter(range(1_000_000))

    def connect() -> Any:
        """HTTP and gRPC clients in turn, one per client thread."""
        grpc = next(counter) % 2 == 1
        return grpcclient.InferenceServerClient(server.grpc_url) if grpc else httpclient.InferenceServerClient(
            server.http_url)

    pool = ClientPool(connect)

    def infer() -> tuple[np.ndarray, str]:
        """The output and the response's own version (one row's, all rows must agree)."""
        client = pool.get()
        api: Any = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
        inp = api.InferInput("TOKENS", list(X.shape), "INT64")
        inp.set_data_from_numpy(X.numpy())
        result = client.infer(model, [inp])
        return np.asarray(result.as_numpy("LOGITS")), response_version(result)

    def swap_to(version: str) -> None:
        """Publish (a hard link: instant) and return as soon as the metrics say it is live, so the next refit
        begins while requests that started on the previous weights are still in flight."""
        publish(data["sources"] / f"{version}.safetensors", weights / model, link=True)
        deadline = time.monotonic() + 60
        while set(weights_versions(scrape(server.metrics_url), model).values()) != {version}:
            assert time.monotonic() < deadline, f"{version} not live after 60 s"
            time.sleep(0.005)

    deadline = time.monotonic() + 60
    while infer()[1] != "z200":
        assert time.monotonic() < deadline
    try:
        # settle_s=0: the next publish follows at once, while requests on the previous slot are in flight
        result = run_swap_load(infer, expected, swap_to, ["z201", "z202", "z203", "z204", "z205", "z206"],
                               clients=4, warmup_s=1.0, settle_s=0.0, cooldown_s=1.0, atol=1e-4)
    finally:
        pool.close()
    print(result.to_json())
    assert result.errors == 0, result.error_samples
    assert result.torn == 0, result.error_samples
    assert result.swaps == 6
    assert len(result.versions_seen) >= 3, result.versions_seen
    assert result.requests_during_swaps > 0
