"""Triton's own reload of a new model version, the baseline hotswap is compared with.

The benchmark MLP served by a plain Python-backend ``model.py`` that loads its weights in ``initialize``
(``safetensors.torch.load_file`` then ``load_state_dict``; no hotswap code in the server). Triton runs
with ``--model-control-mode=explicit``; each new version is published as a new version directory (files
copied under a hidden name, then renamed to ``<n>/``) and loaded through the repository API
(``POST /v2/repository/models/<name>/load``), with ``version_policy: latest 1``, while clients send
requests (:func:`bench.lib.swapload.run_swap_load`).
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lib.host import MemorySampler
from bench.lib.models import mlp_bytes, mlp_output, random_mlp_state
from bench.lib.swapload import ClientPool, run_swap_load
from serving.triton.server import TritonProcess

NAME = "mlp_reload"

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ {width} ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ {width} ] }} ]
instance_group [ {{ count: 1, kind: {kind}{gpus} }} ]
parameters {{ key: "width", value: {{ string_value: "{width}" }} }}
parameters {{ key: "layers", value: {{ string_value: "{layers}" }} }}
"""

#: what a Triton user writes: build the model, load this version's weights, serve. Nothing of hotswap.
MODEL_PY = '''"""Plain Python-backend model: weights loaded once, in initialize, from this version's folder."""

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from safetensors.torch import load_file


class MLP(torch.nn.Module):
    def __init__(self, width, layers, device):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(width, width, bias=False, device=device) for _ in range(layers))
        self.marker = torch.nn.Parameter(torch.zeros(width, device=device))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x + self.marker


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        with torch.device("meta"):
            module = MLP(int(params["width"]), int(params["layers"]), "meta")
        folder = os.path.join(args["model_repository"], args["model_version"])
        state = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(folder, name), device=str(self.device)))
        module.load_state_dict(state, assign=True)
        self.module = module.eval()

    def execute(self, requests):
        responses = []
        with torch.inference_mode():
            for request in requests:
                x = torch.utils.dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, "X").to_dlpack())
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                y = self.module(x.to(self.device))
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                out = pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(y.clone()))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def make_reload_repository(root: Path, width: int, layers: int, kind: str) -> Path:
    model = root / NAME
    model.mkdir(parents=True)
    gpus = ", gpus: [ 0 ]" if kind == "KIND_GPU" else ""
    (model / "config.pbtxt").write_text(CONFIG.format(name=NAME, width=width, layers=layers, kind=kind, gpus=gpus))
    return model


def publish_version(model_dir: Path, number: int, weights: Sequence[Path], *, link: bool = False) -> float:
    """A new version directory: files copied (or hard-linked: large benchmarks) under a hidden name,
    then renamed to ``<number>/``. Returns the time of the rename (what the user's publish step ends with)."""
    tmp = model_dir / f".{number}.tmp"
    tmp.mkdir()
    (tmp / "model.py").write_text(MODEL_PY)
    for f in weights:
        if link:
            os.link(f, tmp / f.name)
        else:
            shutil.copyfile(f, tmp / f.name)
    t = time.monotonic()
    os.rename(tmp, model_dir / str(number))
    return t


def load_model(server: TritonProcess, timeout: float) -> None:
    """The repository API call a user makes after publishing (blocks until Triton has loaded it)."""
    req = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/{NAME}/load", data=b"{}",
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


def random_versions(root: Path, count: int, width: int, layers: int, x: torch.Tensor,
                    device: str) -> tuple[dict[str, list[Path]], dict[str, np.ndarray]]:
    """``count`` + 1 random versions (v0 first), one safetensors file each, and their expected outputs."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    expected: dict[str, np.ndarray] = {}
    for i in range(count + 1):
        sd = random_mlp_state(1000 + i, width, layers)
        (root / f"v{i}").mkdir()
        files[f"v{i}"] = [root / f"v{i}" / "model.safetensors"]
        save_file(sd, str(files[f"v{i}"][0]))
        expected[f"v{i}"] = mlp_output(sd, x, device)
    return files, expected


def measure_reload(work: Path, *, width: int, layers: int, kind: str, files: Mapping[str, Sequence[Path]],
                   expected: Mapping[str, np.ndarray], x: torch.Tensor, swaps: int, clients: int, atol: float,
                   ready_timeout: float, link: bool = False, log: Path | None = None) -> dict[str, Any]:
    """One run of the baseline (``files["v0"]`` served first, then the others in turn); the result has the
    same fields as hotswap's entries in ``bench.gpu_publish``."""
    import tritonclient.grpc as grpcclient

    device = "cuda" if kind == "KIND_GPU" else "cpu"
    model_dir = make_reload_repository(work / "repository", width, layers, kind)
    versions = len(files) - 1
    number = 1
    publish_version(model_dir, number, files["v0"], link=link)
    server = TritonProcess(work / "repository", work_dir=work / "triton", log_path=log,
                           model_control_mode="explicit", extra_args=[f"--load-model={NAME}"])
    out: dict[str, Any] = {"model_bytes": mlp_bytes(width, layers), "instance": kind,
                           "how": "new version directory + POST /v2/repository/models/<name>/load"}
    try:
        t0 = time.monotonic()
        server.start()
        server.wait_ready([NAME], timeout=ready_timeout)
        out["server_ready_s"] = time.monotonic() - t0
        pool = ClientPool(lambda: grpcclient.InferenceServerClient(server.grpc_url))

        def infer() -> np.ndarray:
            inp = grpcclient.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x.numpy())
            return np.asarray(pool.get().infer(NAME, [inp], client_timeout=120).as_numpy("Y"))

        probe = pool.get()  # this thread's: the clients' threads get their own
        first_response_s: list[float] = []
        load_call_s: list[float] = []

        def first_with(version: str, since: float, deadline: float) -> float:
            ref = expected[version]
            while time.monotonic() < deadline:
                inp = grpcclient.InferInput("X", list(x.shape), "FP32")
                inp.set_data_from_numpy(x.numpy())
                try:
                    y = np.asarray(probe.infer(NAME, [inp], client_timeout=120).as_numpy("Y"))
                except Exception:  # noqa: BLE001 - a failed probe is retried; the clients count failures
                    time.sleep(0.005)
                    continue
                if y.shape == ref.shape and np.allclose(y, ref, atol=atol, rtol=0):
                    return time.monotonic() - since
            raise TimeoutError(f"{version} never answered")

        def swap_to(version: str) -> None:
            nonlocal number
            number += 1
            t_publish = publish_version(model_dir, number, files[version], link=link)
            t = time.monotonic()
            load_model(server, timeout=ready_timeout)
            load_call_s.append(time.monotonic() - t)
            first_response_s.append(first_with(version, t_publish, t_publish + ready_timeout))
            shutil.rmtree(model_dir / str(number - 1), ignore_errors=True)  # what a user's cleanup does

        order = [f"v{1 + i % versions}" for i in range(swaps)]
        pid = server.proc.pid if server.proc is not None else None
        with MemorySampler(pid, gpu=device == "cuda") as mem:
            try:
                r = run_swap_load(infer, expected, swap_to, order, clients=clients, warmup_s=3.0, settle_s=0.5,
                                  cooldown_s=2.0, atol=atol)
            finally:
                pool.close()
        result = r.to_json()
        out.update(result)
        out["publish_to_first_response_s"] = {"median": float(np.median(first_response_s)),
                                              "max": max(first_response_s), "all": first_response_s}
        out["load_call_s"] = {"median": float(np.median(load_call_s)), "max": max(load_call_s)}
        out["p99_during_over_steady"] = r.swap_p99_ms / r.steady_p99_ms if r.steady_p99_ms else None
        out["peak_memory_bytes"] = mem.peak_bytes
        out["memory_before_bytes"] = mem.baseline_bytes
        out["peak_memory_over_model"] = mem.peak_bytes / out["model_bytes"]
        out["memory_kind"] = "gpu (nvidia-smi, whole device)" if device == "cuda" else "rss of server and stubs"
    finally:
        out["triton_log_tail"] = server.log_tail(3000)
        server.stop()
    return out
