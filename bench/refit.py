"""Refit benchmark: file-to-live-engine time per stage against the read+copy limit, and cache-hit startup.

    python bench/refit.py --json [--mb 64] [--engines eager,aoti]

Both figures of each ratio come from the same run. The checkpoint is page-cached (written just
before, and read once to warm) for the refit and the limit alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository root

from bench.lib.host import machine  # noqa: E402
from bench.lib.models import transformer_kwargs, transformer_spec  # noqa: E402
from serving.cache import EngineCache  # noqa: E402
from serving.engines import build_engine  # noqa: E402
from serving.examples import TRANSFORMER  # noqa: E402
from serving.factory import build_module  # noqa: E402
from serving.refit import RefitCoordinator  # noqa: E402
from serving.weights.random_state import random_state_dict  # noqa: E402
from serving.weights.writer import write_safetensors  # noqa: E402

FAST_PATH: bool | None = None  # the coordinator's default (fast_path_default): double-buffered, the fast path


def copy_limit(path: Path, targets: dict[str, torch.Tensor]) -> float:
    """Just read the file's tensors and copy the bytes into preallocated tensors on the target device."""
    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            targets[name].copy_(f.get_tensor(name))
    return time.perf_counter() - t0


def bench_refit(engine_kind: str, target_mb: float, repeats: int, cache_dir: Path) -> dict[str, object]:
    kwargs = transformer_kwargs(target_mb)
    spec = transformer_spec(kwargs)
    engine = build_engine(engine_kind, spec, cache=EngineCache(cache_dir))
    coord = RefitCoordinator(engine, fast_path=FAST_PATH)
    module = build_module(TRANSFORMER, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_safetensors(random_state_dict(module, seed), Path(tmp) / f"v{seed}.safetensors")
                 for seed in range(repeats + 2)]
        nbytes = files[0].stat().st_size
        for f in files:
            f.read_bytes()  # warm the page cache for both measurements
        coord.refit_from_path(files[0])
        coord.refit_from_path(files[1])  # both slots exist and hold weights
        targets = {k: torch.empty_like(v) for k, v in module.state_dict().items()}
        limits, totals, stages_all = [], [], []
        for i in range(repeats):
            limits.append(copy_limit(files[i + 2], targets))
            report = coord.refit_from_path(files[i + 2])
            assert report.outcome == "success", report
            totals.append(report.stages["total"])
            stages_all.append(dict(report.stages))
    coord.close()
    refit_s = statistics.median(totals)
    limit_s = statistics.median(limits)
    stages = {k: statistics.median(s[k] for s in stages_all) for k in stages_all[0]}
    return {"engine": engine_kind, "model_mb": round(nbytes / 1e6, 1), "refit_s": round(refit_s, 4),
            "copy_limit_s": round(limit_s, 4), "ratio": round(refit_s / limit_s, 2),
            "stages_s": {k: round(v, 5) for k, v in stages.items()}, "repeats": repeats,
            "build": engine.build_info.cache}


_HIT_SCRIPT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from bench.lib.models import transformer_spec
from serving.cache import EngineCache
from serving.engines import build_engine
t0 = time.perf_counter()
engine = build_engine("aoti", transformer_spec({kwargs!r}), cache=EngineCache(Path({cache!r})))
print(json.dumps({{"s": time.perf_counter() - t0, "cache": engine.build_info.cache}}))
"""


def bench_startup(cache_dir: Path) -> dict[str, object]:
    """Cold AOTInductor build (empty cache) vs a cache hit in a fresh process, the example transformer.

    Both are timed around ``build_engine`` (the interpreter and ``import torch`` are not counted in
    either); the hit runs in a new process so nothing compiled or imported by the cold build helps it.
    """
    kwargs = {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_layers": 2, "vocab": 1000, "seq_len": 16}
    spec = transformer_spec(kwargs)
    cold_dir = cache_dir / "startup"
    t0 = time.perf_counter()
    cold = build_engine("aoti", spec, cache=EngineCache(cold_dir))
    cold_s = time.perf_counter() - t0
    assert cold.build_info.cache == "miss", cold.build_info
    script = _HIT_SCRIPT.format(root=str(ROOT), kwargs=kwargs, cache=str(cold_dir))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    hit = json.loads(out.stdout.strip().splitlines()[-1])
    assert hit["cache"] == "hit", hit
    return {"cold_build_s": round(cold_s, 2), "cache_hit_s": round(hit["s"], 3),
            "speedup": round(cold_s / hit["s"], 1), "hit_in": "a fresh process"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=64.0, help="model size (float32 weights) in MB")
    parser.add_argument("--engines", default="eager,aoti")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {
            "command": " ".join(["python", "bench/refit.py", *sys.argv[1:]]),
            "machine": machine("cpu"),
            "refit": [bench_refit(e, args.mb, args.repeats, Path(tmp)) for e in args.engines.split(",")],
        }
        if not args.no_startup:
            result["startup"] = bench_startup(Path(tmp))
    text = json.dumps(result, indent=2)
    print(text if args.json else f"refit benchmark\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
