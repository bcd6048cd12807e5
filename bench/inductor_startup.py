"""Inductor engine startup: a cold build vs a start from the stripped-engine cache, each in a FRESH process.

    python bench/inductor_startup.py [--device cpu|cuda] [--cuda-graphs] [--out bench/results/x.json]

Each start is its own Python process with its own empty ``TORCHINDUCTOR_CACHE_DIR`` (so torch's local
compile cache never helps); the first gets an empty engine cache (cold: trace, generate and compile
code, store the entry), the second the entry the first stored (cached: load the artifacts, trace, no
codegen). Both time ``build_engine`` (the build includes the warm-up of every graph and the refit
check) and the whole process (interpreter, imports, build, one request).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from bench.lib.host import machine  # noqa: E402
from bench.record import command, write_json  # noqa: E402

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from serving.cache import EngineCache
from serving.engines import build_engine
from serving.specs import BuildSpec, TensorSpec
from serving.factory import build_module
args = json.loads(sys.argv[1])
spec = BuildSpec(factory="serving.examples.transformer:tiny_transformer",
                 inputs=(TensorSpec("TOKENS", torch.int64, (16,)),), max_batch=args["max_batch"],
                 device=args["device"], dtype=getattr(torch, args["dtype"]),
                 factory_kwargs=tuple(sorted(args["kwargs"].items())),
                 options=(("cuda_graphs", True),) if args["cuda_graphs"] else ())
t_build = time.perf_counter()
engine = build_engine("inductor", spec, cache=EngineCache(args["cache"]))
build_s = time.perf_counter() - t_build
slot = engine.new_slot()
module = build_module(spec.factory, spec.kwargs()).to(device=args["device"], dtype=spec.dtype)
slot.refit(slot.transfer(module.state_dict()))
t_first = time.perf_counter()
slot.run([torch.zeros(1, 16, dtype=torch.int64)])
if args["device"].startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"cache": engine.build_info.cache, "detail": engine.build_info.detail, "build_s": build_s,
                  "first_request_s": time.perf_counter() - t_first, "process_s": time.perf_counter() - t0}))
"""


def start(args: dict[str, object], inductor_dir: Path) -> dict[str, object]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
    env.pop("TRITON_CACHE_DIR", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                         env=env, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    a = parser.parse_args()
    kwargs = {"d_model": a.d_model, "n_heads": 4, "d_ff": 2 * a.d_model, "n_layers": a.layers, "vocab": 1000,
              "seq_len": 16}
    with tempfile.TemporaryDirectory(prefix="inductor-startup-") as tmp:
        root = Path(tmp)
        args = {"device": a.device, "dtype": a.dtype, "kwargs": kwargs, "max_batch": a.max_batch,
                "cuda_graphs": a.cuda_graphs, "cache": str(root / "engines")}
        cold = start(args, root / "torch-cold")
        cached = start(args, root / "torch-cached")
    assert cold["cache"] == "miss" and cached["cache"] == "hit", (cold, cached)
    result = {
        "command": command("python bench/inductor_startup.py", sys.argv[1:]),
        "what": "inductor engine startup in a fresh process: cold build vs cached (stripped-engine cache hit)",
        "machine": machine(a.device), "model": {"factory": "tiny_transformer", **kwargs, "dtype": a.dtype,
                                      "max_batch": a.max_batch, "device": a.device, "cuda_graphs": a.cuda_graphs},
        "cold": cold, "cached": cached,
        "build_speedup": round(float(cold["build_s"]) / float(cached["build_s"]), 1),  # type: ignore[arg-type]
    }
    write_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
