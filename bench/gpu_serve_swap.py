"""Zero-downtime swaps on a real Triton server with a GPU instance.

    python -m bench.gpu_serve_swap --json out.json --swaps 20

Starts ``tritonserver`` (from the nvidia-pytriton wheel) on a model repository of its own: one
model per refit strategy, each a ``KIND_GPU`` Python-backend instance serving the benchmark MLP
(``bench.lib.models:big_mlp``, float32) on cuda:0 with the eager engine (``--engine`` for another).
Clients send requests continuously (``bench.lib.swapload``) while ``--swaps`` new versions are
published into the watched folder by the recommended protocol (copy to a hidden name, rename); every response must
match exactly one version's output (no torn reads). Reports requests, errors, torn responses and
p50/p99 latency steady vs during swaps, per strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lib.checkpoints import write_safetensors_stream
from bench.lib.host import machine
from bench.lib.models import FACTORY, mlp_bytes, mlp_output, random_mlp_state
from bench.lib.swapload import ClientPool, response_version, run_swap_load
from bench.lib.triton_repo import make_repository
from bench.record import command, command_args, dumps
from serving.publish import publish
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess


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


def write_versions(folder: Path, count: int, width: int, layers: int, x: torch.Tensor,
                   device: str) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """``count`` + 1 random versions (v0 is the initial one), one file each, and their expected outputs."""
    folder.mkdir()
    files: dict[str, Path] = {}
    expected: dict[str, np.ndarray] = {}
    for i in range(count + 1):
        sd = random_mlp_state(1000 + i, width, layers)
        files[f"v{i}"] = folder / f"v{i}.safetensors"
        write_safetensors_stream(files[f"v{i}"], list(sd.items()))
        expected[f"v{i}"] = mlp_output(sd, x, device)
    return files, expected


def wait_live(srv: TritonProcess, model: str, version: str, failures: list[str], timeout: float = 120.0) -> None:
    """Wait until every instance of ``model`` serves ``version`` (its metrics say so); failed scrapes are
    appended to ``failures`` and retried until the deadline."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    failed = 0
    while time.monotonic() < deadline:
        try:
            seen = weights_versions(scrape(srv.metrics_url), model)
        except OSError as e:  # URLError included: count it, retry, give up only at the deadline
            failed += 1
            failures.append(f"{time.strftime('%H:%M:%S')} {e}")
            if srv.proc is not None and srv.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {srv.proc.returncode}") from e
            time.sleep(0.2)
            continue
        if seen and all(v == version for v in seen.values()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model}: {version} not live after {timeout}s: {seen} ({failed} failed scrapes)")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def serve_and_swap(work: Path, args: argparse.Namespace, results: dict[str, Any],
                   servers: list[TritonProcess]) -> None:
    """Start Triton (appended to ``servers``, for the caller to stop) on a repository of one model per
    strategy, then swap under load on each in turn."""
    device = "cuda" if args.kind == "KIND_GPU" else "cpu"
    strategies = [s for s in args.strategies.split(",") if s]
    weights_root = work / "weights"
    names = make_repository(work / "repository", args.width, args.layers, strategies, args.kind, args.sync_outputs,
                            args.cpu_outputs, args.engine, args.cuda_graphs, not args.no_version_output)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(7))
    files, expected = write_versions(work / "versions", args.versions, args.width, args.layers, x, device)
    for name in names:
        (weights_root / name).mkdir(parents=True)
        publish(files["v0"], weights_root / name)
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights_root), HOTSWAP_CACHE_DIR=str(work / "cache"))
    srv = TritonProcess(work / "repository", work_dir=work / "triton", env=env)
    servers.append(srv)
    t0 = time.perf_counter()
    srv.start()
    srv.wait_ready(names, args.ready_timeout)
    results["server_ready_s"] = time.perf_counter() - t0
    failures = results.setdefault("scrape_failures", [])

    def wait_version(model: str, version: str) -> None:
        wait_live(srv, model, version, failures)

    for name, strategy in zip(names, strategies, strict=True):
        wait_version(name, "v0")
        results.setdefault("v0_max_abs_diff", {})[strategy] = first_diff(srv, name, x, expected["v0"])
        out = run_strategy(srv, name, x, files, expected, weights_root / name, args, wait_version)
        results["strategies"][strategy] = out
        print(f"{strategy}: {json.dumps(out)}", flush=True)


def stop_server(server: TritonProcess, results: dict[str, Any], args: argparse.Namespace) -> None:
    """Keep the server's log, then stop it (a hung shutdown must not lose the results)."""
    results["triton_log_tail"] = server.log_tail(6000)
    if args.triton_log and server.log_path.exists():
        shutil.copyfile(server.log_path, args.triton_log)
    try:
        server.stop()
    except Exception as e:
        results["errors"].append({"error": f"stop: {e}"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a timeout's SIGTERM must still stop the server (it runs in a session of its own)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {"environment": machine("cuda" if args.kind == "KIND_GPU" else "cpu"),
                               "command": command("python3 -m bench.gpu_serve_swap", given),
                               "argv": command_args(given),
                               "model": {"factory": FACTORY, "width": args.width,
                                         "layers": args.layers, "dtype": "float32", "engine": args.engine,
                                         "cuda_graphs": args.cuda_graphs, "instance": args.kind,
                                         "version_output": not args.no_version_output,
                                         "bytes": mlp_bytes(args.width, args.layers)},
                               "sync_outputs": args.sync_outputs, "cpu_outputs": args.cpu_outputs,
                               "strategies": {}, "errors": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-serve-swap-"))
    servers: list[TritonProcess] = []
    try:
        serve_and_swap(work, args, results, servers)
    except Exception as e:
        results["errors"].append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        print(f"!! {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            stop_server(server, results, args)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(dumps(results))
    for strategy, r in results["strategies"].items():
        print(f"{strategy:13} requests {r['requests']} errors {r['errors']} torn {r['torn']} swaps {r['swaps']} "
              f"steady p50/p99 {r['steady_p50_ms']:.2f}/{r['steady_p99_ms']:.2f} ms during swaps "
              f"{r['swap_p50_ms']:.2f}/{r['swap_p99_ms']:.2f} ms")
    for e in results["errors"]:
        print("ERROR", e["error"])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
