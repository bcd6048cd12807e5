"""Clients send requests continuously while versions are swapped: no error, no torn read."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from serving.triton.swapload import classify, run_swap_load

from .conftest import TritonFixture, random_checkpoint, reference_output

pytestmark = pytest.mark.integration

MODEL = "tiny_transformer"
X = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(5))


def test_classify_spots_a_mixed_output() -> None:
    expected = {"a": np.zeros(3), "b": np.ones(3)}
    assert classify(np.zeros(3), expected, 1e-4) == ["a"]
    assert classify(np.array([0.0, 1.0, 0.0]), expected, 1e-4) == []


def test_swaps_under_load_without_errors_or_torn_reads(triton_server: TritonFixture, tmp_path: Path) -> None:
    seeds = [100, 101, 102, 103, 104]
    files = {f"z{s}": random_checkpoint(MODEL, s, tmp_path / f"z{s}.safetensors") for s in seeds}
    expected = {f"z{s}": reference_output(MODEL, s, X).numpy() for s in seeds}
    triton_server.publish(MODEL, files["z100"])
    triton_server.wait_for_version(MODEL, "z100")
    local = threading.local()
    clients: list[httpclient.InferenceServerClient] = []

    def infer() -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(triton_server.http_url)
            clients.append(local.client)
        inp = httpclient.InferInput("TOKENS", list(X.shape), "INT64")
        inp.set_data_from_numpy(X.numpy())
        return np.asarray(local.client.infer(MODEL, [inp]).as_numpy("LOGITS"))

    def swap_to(version: str) -> None:
        triton_server.publish(MODEL, files[version])
        triton_server.wait_for_version(MODEL, version, timeout=60)

    try:
        result = run_swap_load(infer, expected, swap_to, ["z101", "z102", "z103", "z104", "z101"],
                               clients=3, warmup_s=1.0, cooldown_s=1.0)
    finally:
        for c in clients:
            c.close()
    print(result.to_json())
    assert result.errors == 0, result.error_samples
    assert result.torn == 0, result.error_samples
    assert result.swaps == 5
    assert len(result.versions_seen) >= 4, result.versions_seen
    assert result.requests_during_swaps > 0
