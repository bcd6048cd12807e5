"""Zero-downtime swaps on a real Triton server with a GPU instance.

    python -m bench.gpu_serve_swap --json out.json --swaps 20

Starts ``tritonserver`` (from the nvidia-pytriton wheel) on a model repository of its own: one
model per refit strategy, each a ``KIND_GPU`` Python-backend instance serving the benchmark MLP
(``bench.gpu_refit:big_mlp``, float32) on cuda:0 with the eager engine (``--engine`` for another). Clients send requests
continuously (``serving.triton.swapload``) while ``--swaps`` new versions are published into the
watched folder by the recommended protocol (copy to a hidden name, rename); every response must
match exactly one version's output (no torn reads). Reports requests, errors, torn responses and
p50/p99 latency steady vs during swaps, per strategy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_refit import BigMLP, environment, write_safetensors_stream
from bench.record import command, command_args
from serving.publish import publish
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess
from serving.triton.swapload import ClientPool, response_version, run_swap_load

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ {width} ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ {width} ] }}{version_output} ]
instance_group [ {{ count: 1, kind: {kind}{gpus} }} ]
parameters {{ key: "model_factory", value: {{ string_value: "bench.gpu_refit:big_mlp" }} }}
parameters {{ key: "factory_kwargs", value: {{ string_value: "{kwargs}" }} }}
parameters {{ key: "engine", value: {{ string_value: "{engine}" }} }}
parameters {{ key: "refit_strategy", value: {{ string_value: "{strategy}" }} }}
parameters {{ key: "canary", value: {{ string_value: "finite" }} }}
parameters {{ key: "cuda_graphs", value: {{ string_value: "{cuda_graphs}" }} }}
"""
PARAM = 'parameters {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'

MODEL_PY = '"""Triton entry point."""\n\nfrom serving.triton.model import TritonPythonModel\n\n' \
           '__all__ = ["TritonPythonModel"]\n'

#: the same, but the CUDA stream is synchronized before the responses go back: outputs handed to Triton
#: with from_dlpack are read by Triton as soon as execute returns, whether or not the kernels finished
MODEL_PY_SYNC = '''"""Triton entry point (synchronizes CUDA before returning responses)."""

import torch

from serving.triton.model import TritonPythonModel as _Model


class TritonPythonModel(_Model):
    def execute(self, requests):  # type: ignore[no-untyped-def]
        responses = super().execute(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return responses
'''

#: outputs copied to host memory before they are handed to Triton (no DLPack of CUDA memory)
MODEL_PY_CPU_OUT = '''"""Triton entry point (returns outputs from host memory)."""

from serving.triton.model import TritonPythonModel as _Model


class TritonPythonModel(_Model):
    def _output(self, name, tensor):  # type: ignore[no-untyped-def]
        return super()._output(name, tensor.detach().cpu())
'''


def state_for(seed: int, width: int, layers: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.weight": torch.randn(width, width, generator=g) / width ** 0.5 for i in range(layers)}
    sd["marker"] = torch.randn(width, generator=g)
    return sd


def expected_output(sd: dict[str, torch.Tensor], x: torch.Tensor, device: str) -> np.ndarray:
    width = x.shape[1]
    module = BigMLP(width, len(sd) - 1, device, torch.float32)
    module.load_state_dict(sd)
    with torch.inference_mode():
        return module(x.to(device)).cpu().numpy()


VERSION_OUTPUT_DECL = ',\n         { name: "HOTSWAP_WEIGHTS_VERSION", data_type: TYPE_STRING, dims: [ 1 ] }'


def make_repository(root: Path, width: int, layers: int, strategies: list[str], kind: str,
                    sync: bool = False, cpu_outputs: bool = False, engine: str = "eager",
                    cuda_graphs: bool = False, version_output: bool = True, variant: str = "",
                    params: dict[str, str] | None = None) -> list[str]:
    """One model per strategy (``variant`` names them apart; ``params``: more config.pbtxt parameters)."""
    kwargs = json.dumps({"width": width, "layers": layers, "device": "cuda" if kind == "KIND_GPU" else "cpu",
                         "dtype": "float32"}).replace('"', '\\"')
    names = []
    for strategy in strategies:
        name = f"mlp_{engine}_{strategy}" + (f"_{variant}" if variant else "")
        (root / name / "1").mkdir(parents=True)
        gpus = ", gpus: [ 0 ]" if kind == "KIND_GPU" else ""
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, width=width, kind=kind, gpus=gpus,
                                                                kwargs=kwargs, strategy=strategy, engine=engine,
                                                                cuda_graphs=str(cuda_graphs).lower(),
                                                                version_output=(VERSION_OUTPUT_DECL if version_output
                                                                                else ""))
                                                    + "".join(PARAM.format(key=k, value=v)
                                                              for k, v in (params or {}).items()))
        code = MODEL_PY_CPU_OUT if cpu_outputs else MODEL_PY_SYNC if sync else MODEL_PY
        (root / name / "1" / "model.py").write_text(code)
        names.append(name)
    return names


def ensure_pytriton_findable() -> None:
    """``find_triton`` only needs the package's folder; on a machine without pytriton's client-side
    dependencies (pyzmq, sh) ``import pytriton`` fails, so stand in a module that only knows its file."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise
        stub = types.ModuleType("pytriton")
        stub.__file__ = spec.origin
        stub.__spec__ = spec
        stub.__path__ = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
        sys.modules["pytriton"] = stub


def first_diff(srv: TritonProcess, name: str, x: torch.Tensor, ref: np.ndarray) -> float | None:
    """Largest deviation of one served answer from the expected one (diagnoses a systematic mismatch)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        out = np.asarray(client.infer(name, [inp], client_timeout=60).as_numpy("Y"))
        return float(np.abs(out - ref).max()) if out.shape == ref.shape else None
    except Exception:
        return None
    finally:
        client.close()


def run_strategy(srv: TritonProcess, name: str, x: torch.Tensor, files: dict[str, Path],
                 expected: dict[str, np.ndarray], folder: Path, args: argparse.Namespace,
                 wait_version: Callable[[str, str], None]) -> dict[str, Any]:
    """Swap ``args.swaps`` times under load on one model; the swap-load result plus publish-to-live times."""
    import tritonclient.grpc as grpcclient  # the http client needs geventhttpclient, which the GPU image lacks

    pool = ClientPool(lambda: grpcclient.InferenceServerClient(srv.grpc_url))
    swap_s: list[float] = []

    def infer() -> tuple[np.ndarray, str]:
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        result = pool.get().infer(name, [inp], client_timeout=60)
        if args.no_version_output:
            return np.asarray(result.as_numpy("Y"))
        try:
            return np.asarray(result.as_numpy("Y")), response_version(result)
        except ValueError as e:  # a malformed response: say what it held
            r = result.get_response()
            outs = [(o.name, o.datatype, list(o.shape)) for o in r.outputs]
            raise ValueError(f"{e}; outputs {outs}, raw sizes {[len(c) for c in r.raw_output_contents]}") from e

    def swap_to(version: str) -> None:
        t = time.monotonic()
        publish(files[version], folder)
        wait_version(name, version)
        swap_s.append(time.monotonic() - t)

    order = [f"v{1 + i % args.versions}" for i in range(args.swaps)]
    try:
        r = run_swap_load(infer, expected, swap_to, order, clients=args.clients, warmup_s=3.0,
                          settle_s=0.5, cooldown_s=2.0, atol=args.atol)
    finally:
        pool.close()
    out = r.to_json()
    out["publish_to_live_s"] = {"median": float(np.median(swap_s)) if swap_s else None,
                                "max": max(swap_s, default=None)}
    out["p99_during_over_steady"] = (r.swap_p99_ms / r.steady_p99_ms) if r.steady_p99_ms else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--versions", type=int, default=5, help="distinct checkpoints, published in turn")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="rows per request")
    ap.add_argument("--strategies", default="double_buffer,in_place")
    ap.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"])
    ap.add_argument("--engine", default="eager", choices=["eager", "aoti", "inductor", "tensorrt"])
    ap.add_argument("--cuda-graphs", action="store_true", help="cuda_graphs: true (engine inductor)")
    ap.add_argument("--no-version-output", action="store_true",
                    help="without the HOTSWAP_WEIGHTS_VERSION output (for a stub that cannot send strings: numpy 2 "
                         "under Triton 2.51); each response is still matched to one version by its values")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--sync-outputs", action="store_true",
                    help="serve through a model.py that synchronizes CUDA before returning responses")
    ap.add_argument("--cpu-outputs", action="store_true",
                    help="serve through a model.py that copies outputs to host memory before returning them")
    ap.add_argument("--triton-log", metavar="FILE", help="keep tritonserver's whole log here")
    args = ap.parse_args(argv)

    # a timeout's SIGTERM must still stop the server (it runs in a session of its own)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = "cuda" if args.kind == "KIND_GPU" else "cpu"
    strategies = [s for s in args.strategies.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="gpu-serve-swap-"))
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {"environment": environment(device),
                               "command": command("python3 -m bench.gpu_serve_swap", given),
                               "argv": command_args(given),
                               "model": {"factory": "bench.gpu_refit:big_mlp", "width": args.width,
                                         "layers": args.layers, "dtype": "float32", "engine": args.engine,
                                         "cuda_graphs": args.cuda_graphs, "instance": args.kind,
                                         "version_output": not args.no_version_output,
                                         "bytes": 4 * args.width * (args.width * args.layers + 1)},
                               "strategies": {}, "errors": []}
    server: TritonProcess | None = None
    try:
        repo = work / "repository"
        weights_root = work / "weights"
        names = make_repository(repo, args.width, args.layers, strategies, args.kind, args.sync_outputs,
                                args.cpu_outputs, args.engine, args.cuda_graphs, not args.no_version_output)
        results["sync_outputs"], results["cpu_outputs"] = args.sync_outputs, args.cpu_outputs
        x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(7))
        files: dict[str, Path] = {}
        expected: dict[str, np.ndarray] = {}
        source = work / "versions"
        source.mkdir()
        for i in range(args.versions + 1):  # v0 is the initial version
            sd = state_for(1000 + i, args.width, args.layers)
            version = f"v{i}"
            files[version] = source / f"{version}.safetensors"
            write_safetensors_stream(files[version], list(sd.items()))
            expected[version] = expected_output(sd, x, device)
        for name in names:
            (weights_root / name).mkdir(parents=True)
            publish(files["v0"], weights_root / name)
        env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights_root), HOTSWAP_CACHE_DIR=str(work / "cache"))
        server = TritonProcess(repo, work_dir=work / "triton", env=env)
        t0 = time.perf_counter()
        server.start()
        server.wait_ready(names, args.ready_timeout)
        results["server_ready_s"] = time.perf_counter() - t0
        assert server is not None
        srv = server

        def wait_version(model: str, version: str, timeout: float = 120.0) -> None:
            deadline = time.monotonic() + timeout
            seen: dict[str, str] = {}
            failures = 0
            while time.monotonic() < deadline:
                try:
                    seen = weights_versions(scrape(srv.metrics_url), model)
                except OSError as e:  # URLError included: count it, retry, give up only at the deadline
                    failures += 1
                    results.setdefault("scrape_failures", []).append(f"{time.strftime('%H:%M:%S')} {e}")
                    if srv.proc is not None and srv.proc.poll() is not None:
                        raise RuntimeError(f"tritonserver exited with {srv.proc.returncode}") from e
                    time.sleep(0.2)
                    continue
                if seen and all(v == version for v in seen.values()):
                    return
                time.sleep(0.05)
            raise TimeoutError(f"{model}: {version} not live after {timeout}s: {seen} ({failures} failed scrapes)")

        for name, strategy in zip(names, strategies, strict=True):
            wait_version(name, "v0")
            results.setdefault("v0_max_abs_diff", {})[strategy] = first_diff(srv, name, x, expected["v0"])
            out = run_strategy(srv, name, x, files, expected, weights_root / name, args, wait_version)
            results["strategies"][strategy] = out
            print(f"{strategy}: {json.dumps(out)}", flush=True)
    except Exception as e:
        results["errors"].append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        print(f"!! {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            results["triton_log_tail"] = server.log_tail(6000)
            if args.triton_log and server.log_path.exists():
                shutil.copyfile(server.log_path, args.triton_log)
            try:
                server.stop()
            except Exception as e:  # a hung shutdown must not lose the results
                results["errors"].append({"error": f"stop: {e}"})
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    for strategy, r in results["strategies"].items():
        print(f"{strategy:13} requests {r['requests']} errors {r['errors']} torn {r['torn']} swaps {r['swaps']} "
              f"steady p50/p99 {r['steady_p50_ms']:.2f}/{r['steady_p99_ms']:.2f} ms during swaps "
              f"{r['swap_p50_ms']:.2f}/{r['swap_p99_ms']:.2f} ms")
    for e in results["errors"]:
        print("ERROR", e["error"])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
