"""Zero-downtime load test on a real Triton: clients send requests continuously while versions swap.

    python bench/serve_swap.py --json [--model tiny_transformer] [--clients 4] [--swaps 20]

Starts tritonserver (the nvidia-pytriton wheel) on free loopback ports with the example
repository, publishes ``--swaps`` versions by the rename protocol while ``--clients`` threads send
requests over HTTP, and reports requests, errors, torn responses (matching no single version) and
latency percentiles steady vs during swaps. Every loop is bounded; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as httpclient

from serving.examples import CNN, TRANSFORMER
from serving.factory import build_module
from serving.publish import publish
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess, models_in, seed_weights
from serving.triton.swapload import ClientPool, response_version, run_swap_load
from serving.weights.random_state import random_state_dict
from serving.weights.writer import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny_transformer": (TRANSFORMER, "TOKENS", "INT64"), "tiny_cnn": (CNN, "IMAGE", "FP32")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_transformer", choices=sorted(MODELS))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after each swap counted as 'during'")
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    factory, input_name, datatype = MODELS[args.model]
    module = build_module(factory)
    x = (torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3)) if datatype == "INT64"
         else torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    order = [f"s{i:03d}" for i in range(args.swaps)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(work / "weights"),
                   HOTSWAP_CACHE_DIR=os.environ.get("HOTSWAP_CACHE_DIR", str(work / "cache")))
        repo = Path(args.repository)
        seed_weights(repo, env)
        staged = work / "staged"
        expected = {}
        for i, version in enumerate(order):
            state = random_state_dict(module, 1000 + i)
            write_safetensors(state, staged / f"{version}.safetensors")
            module.load_state_dict(state)
            with torch.inference_mode():
                expected[version] = module(x).numpy()
        server = TritonProcess(repo, work_dir=work / "run", env=env)
        server.start()
        try:
            server.wait_ready([m.name for m in models_in(repo)], timeout=900)
            folder = work / "weights" / args.model
            pool = ClientPool(lambda: httpclient.InferenceServerClient(server.http_url, connection_timeout=30,
                                                                       network_timeout=30))

            def infer() -> tuple[np.ndarray, str]:
                inp = httpclient.InferInput(input_name, list(x.shape), datatype)
                inp.set_data_from_numpy(x.numpy())
                result = pool.get().infer(args.model, [inp])
                # the weights version the response names must be the one its output matches
                return np.asarray(result.as_numpy("LOGITS")), response_version(result)

            def swap_to(version: str) -> None:
                publish(staged / f"{version}.safetensors", folder)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    live = weights_versions(scrape(server.metrics_url), args.model)
                    if live and set(live.values()) == {version}:
                        return
                    time.sleep(0.05)
                raise TimeoutError(f"{version} not live after 60 s: {live}")

            # install the first version before the clients start, so every response has a reference
            swap_to(order[0])
            result = run_swap_load(infer, expected, swap_to, order[1:], clients=args.clients,
                                   settle_s=args.settle)
            pool.close()
        finally:
            server.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    out = {"command": " ".join(["python", "bench/serve_swap.py", *sys.argv[1:]]),
           "model": args.model, "clients": args.clients, "commit": commit, "date": time.strftime("%Y-%m-%d"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
           **result.to_json()}
    print(json.dumps(out, indent=2) if args.json else out)
    return 0 if result.errors == 0 and result.torn == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
