"""A real Triton server (from the nvidia-pytriton wheel), started once per test session on free ports."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from session_engines import CompiledEngine

from serving.examples import CNN, TRANSFORMER
from serving.factory import build_module
from serving.publish import publish
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess, seed_weights
from serving.triton.version_output import VERSION_OUTPUT, VERSION_UTF8_OUTPUT, decode_utf8
from serving.weights.random_state import random_state_dict
from serving.weights.writer import write_safetensors

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
FACTORIES = {"tiny_transformer": TRANSFORMER, "tiny_cnn": CNN}
MODELS = tuple(FACTORIES)


def random_checkpoint(model: str, seed: int, out: Path) -> Path:
    """A valid checkpoint of an example model (same seed, same tensors), written atomically."""
    return write_safetensors(random_state_dict(build_module(FACTORIES[model]), seed), out)


def reference_output(model: str, seed: int, x: torch.Tensor) -> torch.Tensor:
    """What the eager model computes on ``x`` with the checkpoint of ``seed``."""
    module = build_module(FACTORIES[model])
    module.load_state_dict(random_state_dict(module, seed))
    with torch.inference_mode():
        return module(x)


#: fixed inputs of the example models
INPUTS = {
    "tiny_transformer": torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(11)),
    "tiny_cnn": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12)),
}
WIRE = {"tiny_transformer": ("TOKENS", "INT64"), "tiny_cnn": ("IMAGE", "FP32")}


def infer_versioned(url: str, model: str, x: torch.Tensor, *, protocol: str = "http") -> tuple[np.ndarray, list[str]]:
    """One request through tritonclient's HTTP (or gRPC) client: the logits, and the weights version each row
    names (the ``HOTSWAP_WEIGHTS_VERSION`` output, which must agree with ``HOTSWAP_WEIGHTS_VERSION_UTF8``)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    api: Any = httpclient if protocol == "http" else grpcclient
    name, dtype = WIRE[model]
    client = api.InferenceServerClient(url)
    try:
        inp = api.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x.numpy())
        result = client.infer(model, [inp])
        versions = [v.decode() for v in np.asarray(result.as_numpy(VERSION_OUTPUT)).reshape(-1)]
        utf8 = [decode_utf8(row) for row in np.asarray(result.as_numpy(VERSION_UTF8_OUTPUT))]
        assert utf8 == versions, f"{VERSION_UTF8_OUTPUT} says {utf8}, {VERSION_OUTPUT} says {versions}"
        return np.asarray(result.as_numpy("LOGITS")), versions
    finally:
        client.close()


def infer(url: str, model: str, x: torch.Tensor, *, protocol: str = "http") -> np.ndarray:
    """One request through tritonclient's HTTP (or, with ``protocol="grpc"``, gRPC) client."""
    return infer_versioned(url, model, x, protocol=protocol)[0]


@dataclass
class TritonFixture:
    server: TritonProcess
    weights_root: Path
    cache_dir: Path
    #: what the server answered right after it became ready, before any test published anything
    startup_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    startup_outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    def weights_dir(self, model: str) -> Path:
        return self.weights_root / model

    def publish(self, model: str, src: Path, name: str | None = None) -> Path:
        """Publish ``src`` into the model's weights folder with :func:`serving.publish.publish`."""
        return publish(src, self.weights_dir(model), version=name)

    def versions(self, model: str) -> dict[str, str]:
        """instance -> live weights version, from Triton's /metrics."""
        return weights_versions(scrape(self.metrics_url), model)

    def wait_for_version(self, model: str, version: str, timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.versions(model)
            if seen and all(v == version for v in seen.values()):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"{model}: version {version!r} not live on every instance after {timeout}s: {seen}\n"
                             f"{self.server.log_tail(4000)}")


def start_server(work: Path, weights_root: Path, cache_dir: Path) -> TritonProcess:
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights_root), HOTSWAP_CACHE_DIR=str(cache_dir))
    seed_weights(REPOSITORY, env)
    server = TritonProcess(REPOSITORY, work_dir=work, env=env)
    server.start()
    try:
        server.wait_ready(MODELS, timeout=900)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def engine_cache_dir(tmp_path_factory: pytest.TempPathFactory, aoti_transformer: CompiledEngine) -> Path:
    """The servers' engine cache: a copy of the session's example-transformer build (tests/conftest.py), so
    tiny_transformer starts from a hit; the model is compiled once per session, not once more in Triton."""
    dest = tmp_path_factory.mktemp("engine-cache")
    shutil.copytree(aoti_transformer.cache.root, dest, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, engine_cache_dir: Path) -> Iterator[TritonFixture]:
    work = tmp_path_factory.mktemp("triton")
    server = start_server(work, work / "weights", engine_cache_dir)
    try:
        fixture = TritonFixture(server, work / "weights", engine_cache_dir)
        for model in MODELS:
            fixture.startup_versions[model] = fixture.versions(model)
            fixture.startup_outputs[model] = infer(server.http_url, model, INPUTS[model])
        yield fixture
    finally:
        server.stop()
