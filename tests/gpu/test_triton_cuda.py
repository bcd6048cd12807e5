"""The example transformer through a real Triton on a GPU instance: ``engine: inductor``, ``engine: auto``, and
``engine: aoti`` where its loader crashes.

One server, three copies of ``model_repository/tiny_transformer`` on ``KIND_GPU``:

* ``inductor``: serves, a published checkpoint swaps in, every answer equals the eager model with the
  same weights;
* ``auto``: the startup log names the engine it chose on this GPU and why (TensorRT when it works,
  otherwise inductor), and it serves the same answers;
* ``aoti``: either it loads and serves the same answers, or its load fails with the reason (the loader
  probe's verdict) while the server and the other models go on: a stub never segfaults.

The copies keep the example's version outputs. Under numpy 2, Triton 2.51's stub cannot send a string output
(:mod:`serving.triton.version_output`): the model leaves ``HOTSWAP_WEIGHTS_VERSION`` out and the version travels in
``HOTSWAP_WEIGHTS_VERSION_UTF8``, which every answer here must carry, naming the version published.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.examples import TRANSFORMER
from serving.factory import build_module
from serving.triton.server import TritonProcess
from serving.triton.version_output import VERSION_OUTPUT, VERSION_UTF8_OUTPUT, decode_utf8, string_output_problem
from serving.weights.random_state import random_state_dict
from serving.weights.writer import write_safetensors

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
ENGINES = ("inductor", "auto", "aoti")
X = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(11))


def reference(seed: int) -> np.ndarray:
    module = build_module(TRANSFORMER)
    module.load_state_dict(random_state_dict(module, seed))
    with torch.inference_mode():
        return module(X).numpy()


def repository(dest: Path) -> list[str]:
    names = []
    for engine in ENGINES:
        name = f"transformer_{engine}"
        shutil.copytree(REPOSITORY / "tiny_transformer", dest / name)
        config = dest / name / "config.pbtxt"
        text = config.read_text().replace('name: "tiny_transformer"', f'name: "{name}"')
        text, n = re.subn(r'(key: "engine", value: \{ string_value: )"aoti"', rf'\1"{engine}"', text)
        assert n == 1, "the example config no longer names engine 'aoti'"
        text, n = re.subn(r"kind: KIND_CPU", "kind: KIND_GPU, gpus: [ 0 ]", text)
        assert n == 1
        config.write_text(text)
        names.append(name)
    return names


def infer_versioned(url: str, model: str) -> tuple[np.ndarray, list[str]]:
    """The logits, and the version each row names in ``HOTSWAP_WEIGHTS_VERSION_UTF8`` (and in the string output,
    where this numpy lets the stub send it: then both must agree)."""
    import tritonclient.grpc as grpcclient  # the GPU image's tritonclient has no HTTP extra

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("TOKENS", list(X.shape), "INT64")
        inp.set_data_from_numpy(X.numpy())
        result = client.infer(model, [inp])
        rows = np.asarray(result.as_numpy(VERSION_UTF8_OUTPUT))
        assert rows.shape == (X.shape[0], 64), rows.shape
        versions = [decode_utf8(row) for row in rows]
        strings = result.as_numpy(VERSION_OUTPUT)
        if string_output_problem(np.__version__, utf8_declared=True):
            assert strings is None, "the string output was sent although this stub cannot send it"
        else:
            assert [v.decode() for v in np.asarray(strings).reshape(-1)] == versions
        return np.asarray(result.as_numpy("LOGITS")), versions
    finally:
        client.close()


def infer(url: str, model: str) -> np.ndarray:
    return infer_versioned(url, model)[0]


def wait_until(predicate: object, timeout: float, what: str, server: TritonProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} after {timeout}s\n{server.log_tail(6000)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonProcess, Path]]:
    root = tmp_path_factory.mktemp("triton-cuda")
    names = repository(root / "repo")
    weights = root / "weights"
    for name in names:  # the first weights: seed 0
        (weights / name).mkdir(parents=True)
        write_safetensors(random_state_dict(build_module(TRANSFORMER), 0), weights / name / "v0.safetensors")
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights), HOTSWAP_CACHE_DIR=str(root / "cache"),
               TORCHINDUCTOR_CACHE_DIR=str(root / "torchinductor"))
    srv = TritonProcess(root / "repo", work_dir=root / "triton", env=env)
    srv.start()
    try:
        srv.wait_ready(("transformer_inductor", "transformer_auto"), timeout=600)
        wait_until(lambda: srv.model_ready("transformer_aoti") or srv.failed_models(["transformer_aoti"]), 600,
                   "transformer_aoti neither loaded nor failed", srv)
        yield srv, weights
    finally:
        assert srv.stop(timeout=60) == 0, srv.log_tail()


def test_inductor_serves_the_example_transformer_and_swaps_exactly(server: tuple[TritonProcess, Path]) -> None:
    srv, weights = server
    log = srv.log_tail(400_000)
    assert "transformer_inductor: engine inductor on cuda:0 (set in the configuration)" in log, log[-4000:]
    logits, versions = infer_versioned(srv.grpc_url, "transformer_inductor")
    np.testing.assert_allclose(logits, reference(0), atol=1e-3, rtol=1e-3)
    assert versions == ["v0"] * X.shape[0]
    dest = weights / "transformer_inductor" / "v31.safetensors"
    write_safetensors(random_state_dict(build_module(TRANSFORMER), 31), dest)
    want = reference(31)
    wait_until(lambda: np.allclose(infer(srv.grpc_url, "transformer_inductor"), want, atol=1e-3, rtol=1e-3), 120,
               "v31 not served", srv)
    assert np.abs(want - reference(0)).max() > 1e-2  # the swap changed the answers
    logits, versions = infer_versioned(srv.grpc_url, "transformer_inductor")
    np.testing.assert_allclose(logits, want, atol=1e-3, rtol=1e-3)
    assert versions == ["v31"] * X.shape[0]  # the version that computed them, under this numpy


def test_auto_says_which_engine_it_chose_on_the_gpu_and_why(server: tuple[TritonProcess, Path]) -> None:
    srv, _ = server
    log = srv.log_tail(400_000)
    chose = re.search(r"transformer_auto: engine (\w+) on cuda:0 \(([^\n]*)\)", log)
    assert chose, log[-4000:]
    print(f"\n{chose[0]}")
    try:
        import tensorrt  # noqa: F401
        assert chose[1] in ("tensorrt", "inductor"), chose[0]
    except ImportError:
        assert chose[1] == "inductor" and "TensorRT cannot run here" in chose[2], chose[0]
    np.testing.assert_allclose(infer(srv.grpc_url, "transformer_auto"), reference(0), atol=1e-3, rtol=1e-3)


def test_aoti_serves_or_is_refused_with_the_reason_and_the_server_goes_on(server: tuple[TritonProcess, Path]) -> None:
    srv, _ = server
    if srv.model_ready("transformer_aoti"):
        np.testing.assert_allclose(infer(srv.grpc_url, "transformer_aoti"), reference(0), atol=1e-3, rtol=1e-3)
        return
    log = srv.log_tail(400_000)
    refused = re.search(r"engine 'aoti' cannot run on this machine \(cuda:0, torch [^)]*\): loading a compiled "
                        r"package in a child process, package_loader: the loader (crashed with SIG\w+|failed|did not)"
                        r"[^\n]*", log)
    assert refused, log[-6000:]
    print(f"\n{refused[0]}")  # the verdict, in the suite's log (pytest -s)
    assert "Use engine 'inductor'" in log
    # the refusal took down nothing else
    assert srv.proc is not None and srv.proc.poll() is None
    np.testing.assert_allclose(infer(srv.grpc_url, "transformer_auto"), reference(0), atol=1e-3, rtol=1e-3)
