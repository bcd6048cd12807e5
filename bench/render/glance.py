"""The README's "At a glance": a handful of headline figures, each linking the JSON it comes from.

The headlines come from named result files (the runs of the defaults); a named file that is missing is an
error, not a line left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.render.fmt import files, link, load, machine, secs

#: the result file of each headline (the GPU publish: the run of today's defaults, weights_transfer auto → KvikIO)
GPU_PUBLISH = "gpu-publish-kvikio-h200.json"
CPU_PUBLISH = "publish-cpu2-double_buffer.json"
CPU_REFIT = "refit-cpu2.json"
GPU_STARTUP = "inductor-startup-h200.json"
#: every run that counts errors and torn responses under swaps
SWAP_RUNS = ("serve-swap-*.json", "gpu-serve-swap-*.json", "gpu-publish-*.json", "soak-*.json")


def _named(results: Path, name: str) -> tuple[Path, dict[str, Any]]:
    path = results / name
    if not path.exists():
        raise ValueError(f"{name}: the README's 'At a glance' quotes this result file, and it is not in {results}; "
                         f"restore it or change bench/render/glance.py")
    return path, load(path)


def _median(v: Any) -> float:
    return float(v["median"] if isinstance(v, dict) else v)


def gpu_publish(results: Path) -> str:
    p, doc = _named(results, GPU_PUBLISH)
    sizes = [s for s in doc["sizes"] if s.get("baseline") and (s.get("hotswap") or {}).get("double_buffer")]
    parts = []
    for s in sizes:
        hot = _median(s["hotswap"]["double_buffer"]["publish_to_first_response_s"])
        base = _median(s["baseline"]["publish_to_first_response_s"])
        parts.append(f"{s['model_bytes'] / 1e9:.0f} GB in **{secs(hot)}** against {secs(base)} ({base / hot:.0f}x)")
    return (f"* **Publish → first response through Triton on a GPU** under client load, against Triton's own reload "
            f"of the same versions ({machine(doc)}): " + "; ".join(parts) + f" ({link(p, '')}).\n")


def cpu_publish(results: Path) -> str:
    p, doc = _named(results, CPU_PUBLISH)
    q, refit = _named(results, CPU_REFIT)
    live = ", ".join(f"{r['engine']} {secs(r['refit_s'])}" for r in refit["refit"])
    return (f"* **On a CPU** ({machine(doc)}): a {doc['checkpoint_mb']:.0f} MB checkpoint renamed into the watched "
            f"folder answers the next request in **{secs(doc['median_s']['first_response'])}** ({link(p, '')}); "
            f"a page-cached {refit['refit'][0]['model_mb']:.0f} MB file to the live engine: {live} "
            f"({link(q, '')}).\n")


def zero_downtime(results: Path) -> str:
    swaps = requests = errs = torn = 0
    paths = [p for pattern in SWAP_RUNS for p in files(pattern, results)]
    for p in paths:
        doc = load(p)
        runs = [doc] if "torn" in doc else list((doc.get("strategies") or {}).values())
        runs += [r for s in doc.get("sizes") or [] for r in (s.get("hotswap") or {}).values()
                 if isinstance(r, dict) and "torn" in r]
        for r in runs:
            swaps, requests = swaps + r["swaps"], requests + r["requests"]
            errs, torn = errs + r["errors"], torn + r["torn"]
    return (f"* **Zero downtime**: {swaps} swaps on a real Triton under client load, {requests:,} requests: "
            f"**{errs} failed, {torn} torn** (a response matching no single version), CPU and GPU instances "
            f"({', '.join(link(p, '') for p in paths)}).\n")


def startup(results: Path) -> str:
    p, refit = _named(results, CPU_REFIT)
    q, gpu = _named(results, GPU_STARTUP)
    s = refit["startup"]
    return (f"* **Engine startup from the stripped-engine cache**: AOTInductor on a CPU {secs(s['cold_build_s'])} "
            f"cold, **{secs(s['cache_hit_s'])}** from the cache ({link(p, '')}); Inductor on a GPU "
            f"{secs(gpu['cold']['build_s'])} cold, **{secs(gpu['cached']['build_s'])}** from the cache "
            f"({link(q, '')}).\n")


def glance(results: Path) -> str:
    """The headline lines, in order."""
    return "".join(f(results) for f in (gpu_publish, cpu_publish, zero_downtime, startup))
