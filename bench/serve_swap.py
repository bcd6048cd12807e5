"""Zero-downtime load test on a real Triton: clients send requests continuously while versions swap.

    python bench/serve_swap.py --json [--model tiny_transformer] [--clients 4] [--swaps 20]

Starts tritonserver (the nvidia-pytriton wheel) on free loopback ports with the example
repository, publishes ``--swaps`` versions by the rename protocol while ``--clients`` threads send
requests over HTTP, and reports requests, errors, torn responses (matching no single version),
latency percentiles steady vs during swaps, and the per-request ``timeline`` (every request's start
and latency, every swap from publish to live). Every loop is bounded; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from bench.lib.host import commit, machine  # noqa: E402
from bench.lib.swapload import ClientPool, SwapLoadResult, response_version, run_swap_load  # noqa: E402
from bench.record import dumps  # noqa: E402
from serving.examples import CNN, TRANSFORMER  # noqa: E402
from serving.factory import build_module  # noqa: E402
from serving.publish import publish  # noqa: E402
from serving.triton.scrape import scrape, weights_versions  # noqa: E402
from serving.triton.server import TritonProcess, models_in, seed_weights  # noqa: E402
from serving.weights.random_state import random_state_dict  # noqa: E402
from serving.weights.writer import write_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny_transformer": (TRANSFORMER, "TOKENS", "INT64"), "tiny_cnn": (CNN, "IMAGE", "FP32")}


def write_versions(model: str, x: torch.Tensor, order: list[str], staged: Path) -> dict[str, np.ndarray]:
    """One random checkpoint per version under ``staged``; what each answers to ``x``."""
    module = build_module(MODELS[model][0])
    expected = {}
    for i, version in enumerate(order):
        state = random_state_dict(module, 1000 + i)
        write_safetensors(state, staged / f"{version}.safetensors")
        module.load_state_dict(state)
        with torch.inference_mode():
            expected[version] = module(x).numpy()
    return expected


def swap_under_load(server: TritonProcess, args: argparse.Namespace, x: torch.Tensor, order: list[str],
                    expected: dict[str, np.ndarray], staged: Path, folder: Path) -> SwapLoadResult:
    """Publish the versions in ``order`` into ``folder``, each waited for until live, while clients send."""
    _, input_name, datatype = MODELS[args.model]
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

    with pool:
        # install the first version before the clients start, so every response has a reference
        swap_to(order[0])
        return run_swap_load(infer, expected, swap_to, order[1:], clients=args.clients, settle_s=args.settle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_transformer", choices=sorted(MODELS))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after each swap counted as 'during'")
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    x = (torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
         if MODELS[args.model][2] == "INT64" else torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    order = [f"s{i:03d}" for i in range(args.swaps)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(work / "weights"),
                   HOTSWAP_CACHE_DIR=os.environ.get("HOTSWAP_CACHE_DIR", str(work / "cache")))
        repo = Path(args.repository)
        seed_weights(repo, env)
        expected = write_versions(args.model, x, order, work / "staged")
        server = TritonProcess(repo, work_dir=work / "run", env=env)
        server.start()
        try:
            server.wait_ready([m.name for m in models_in(repo)], timeout=900)
            result = swap_under_load(server, args, x, order, expected, work / "staged",
                                     work / "weights" / args.model)
        finally:
            server.stop()
    out = {"command": " ".join(["python", "bench/serve_swap.py", *sys.argv[1:]]),
           "model": args.model, "clients": args.clients, "commit": commit(), "date": time.strftime("%Y-%m-%d"),
           "machine": machine("cpu"), **result.to_json(), "timeline": result.timeline()}
    print(dumps(out) if args.json else {k: v for k, v in out.items() if k != "timeline"})
    return 0 if result.errors == 0 and result.torn == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
