"""The soak's resource samples: what it reads every N swaps, and whether each series stayed flat.

A sample reads every series three times, 0.2 s apart, and keeps the smallest reading of each: a thread or
a file that exists for a moment (a hash pool's worker, a publish's temporary entry) is not a leak, and what
leaks is still there at the third reading. Series are named ``<process>/<what>`` (a stub by its model
instance, ``server`` for tritonserver), ``gpu/...``, ``triton/...``, ``metrics/...`` and ``files/...``;
:data:`SERIES_DOCS` says what each measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib.resources import (
    Proc,
    count_paths,
    gpu_process_bytes,
    gpu_used_bytes,
    process_sample,
    stubs,
    why_not_gpu,
)
from bench.lib.stats import growth_pct
from serving.publish.protocol import is_temp_name
from serving.triton.scrape import scrape

#: what each series (by the part after the last ``/``) measures, and its unit
SERIES_DOCS: Mapping[str, tuple[str, str]] = {
    "rss_bytes": ("bytes", "resident memory (/proc/PID/status VmRSS), file pages mapped for reading included"),
    "rss_anon_bytes": ("bytes", "anonymous resident memory (RssAnon): the heap, without mapped file pages"),
    "deleted_fds": ("count", "open descriptors of deleted files (a pruned version still open keeps its disk space)"),
    "deleted_mapped_bytes": ("bytes", "mappings of deleted files (a pruned version still mapped)"),
    "fds": ("count", "open file descriptors (/proc/PID/fd)"),
    "threads": ("count", "threads (/proc/PID/status Threads)"),
    "vm_lck_bytes": ("bytes", "memory locked with mlock (VmLck)"),
    "vm_pin_bytes": ("bytes", "pages pinned by the kernel for the process (VmPin); CUDA's pinned host memory is "
                              "not counted here"),
    "nvidia_mapped_bytes": ("bytes", "address space mapped from /dev/nvidia*: CUDA's pinned host allocations "
                                     "(cudaHostAlloc) and the driver's own mappings"),
    "gpu_bytes": ("bytes", "GPU memory of the process (nvidia-smi --query-compute-apps)"),
    "used_bytes": ("bytes", "GPU memory in use on the device, every process (nvidia-smi); the soak's own "
                            "reference copy of the model included"),
    "pinned_pool_used_bytes": ("bytes", "Triton's own pinned host memory pool in use "
                                        "(nv_pinned_memory_pool_used_bytes)"),
    "hotswap_series": ("count", "hotswap_* series on Triton's /metrics"),
    "server_tmp": ("count", "files and folders in the server's private TMPDIR (the stubs' temporary files)"),
    "hotswap_work_dirs": ("count", "hotswap-* work folders in that TMPDIR and what they hold"),
    "engine_cache": ("count", "files and folders in the engine cache (HOTSWAP_CACHE_DIR)"),
    "weights_leftovers": ("count", "hidden and temporary entries in the weights folders and what they hold: "
                                   "publishes' leftovers (visible entries are pruned after each swap)"),
}
#: the target: under this % growth per 100 swaps after warm-up
TARGET_PCT_PER_100 = 1.0


@dataclass
class Watched:
    """Where the series are read: the server's pid and its folders."""

    server_pid: int
    metrics_url: str
    tmp_dir: Path
    cache_dir: Path
    weights_root: Path
    gpu: bool
    stub_pids: dict[str, int] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)


def read_once(w: Watched, gpu_why: str | None) -> dict[str, float | None]:
    """Every series, read once."""
    found = stubs(w.server_pid)
    for p in found:
        was = w.stub_pids.setdefault(p.name, p.pid)
        if was != p.pid:
            w.restarts.append(f"{p.name}: pid {was} -> {p.pid}")
            w.stub_pids[p.name] = p.pid
    gone = sorted(set(w.stub_pids) - {p.name for p in found})
    per_gpu = gpu_process_bytes() if w.gpu and gpu_why is None else {}
    out: dict[str, float | None] = {}
    for p in [*found, Proc(w.server_pid, "server")]:
        for k, v in process_sample(p.pid, gpu=w.gpu).items():
            out[f"{p.name}/{k}"] = v
        if w.gpu:
            out[f"{p.name}/gpu_bytes"] = per_gpu.get(p.pid)
    for name in gone:  # a stub that exited: its series read None from here on
        out[f"{name}/rss_bytes"] = None
    if w.gpu:
        out["gpu/used_bytes"] = gpu_used_bytes() if gpu_why is None else None
    try:
        samples = scrape(w.metrics_url)
        out["metrics/hotswap_series"] = sum(1 for s in samples if s.name.startswith("hotswap_"))
        pool = [s.value for s in samples if s.name == "nv_pinned_memory_pool_used_bytes"]
        out["triton/pinned_pool_used_bytes"] = pool[0] if pool else None
    except OSError:
        out["metrics/hotswap_series"] = out["triton/pinned_pool_used_bytes"] = None
    out["files/server_tmp"] = count_paths(w.tmp_dir)
    out["files/hotswap_work_dirs"] = count_paths(w.tmp_dir, lambda n: n.startswith("hotswap-"))
    out["files/engine_cache"] = count_paths(w.cache_dir)
    out["files/weights_leftovers"] = sum(count_paths(d, is_temp_name) for d in w.weights_root.iterdir())
    return out


def smallest(readings: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Per series, the smallest reading that is not None (None if none is). Pure."""
    names = sorted({k for r in readings for k in r})
    out: dict[str, float | None] = {}
    for k in names:
        values = [v for r in readings if (v := r.get(k)) is not None]
        out[k] = min(values) if values else None
    return out


def sample(w: Watched, gpu_why: str | None, reads: int = 3, gap_s: float = 0.2,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, float | None]:
    """Every series: the smallest of ``reads`` readings ``gap_s`` apart."""
    readings = []
    for i in range(reads):
        if i:
            sleep(gap_s)
        readings.append(read_once(w, gpu_why))
    return smallest(readings)


def gpu_reason(gpu: bool) -> str | None:
    """Why GPU series are not recorded (None: they are)."""
    return "the CPU run serves on KIND_CPU instances: no GPU memory to measure" if not gpu else why_not_gpu()


def analyse(swaps: Sequence[int], values: Sequence[float | None], warmup: int,
            target_pct: float = TARGET_PCT_PER_100) -> dict[str, object]:
    """One series: its growth after ``warmup`` swaps (least-squares slope per 100 swaps, in % of its mean)
    and whether that is under ``target_pct``; a series with a missing value after warm-up fails. Pure."""
    after = [(s, v) for s, v in zip(swaps, values, strict=True) if s >= warmup]
    missing = [s for s, v in after if v is None]
    if missing:
        return {"growth_pct_per_100_swaps": None, "flat": False,
                "why": f"not measured at swap(s) {missing[:5]} (the process was gone?)"}
    points = [(s, float(v)) for s, v in after if v is not None]
    if len(points) < 2:
        return {"growth_pct_per_100_swaps": None, "flat": None, "why": "fewer than two samples after warm-up"}
    pct = growth_pct([p[0] for p in points], [p[1] for p in points], per=100)
    if pct is None:
        return {"growth_pct_per_100_swaps": None, "flat": False, "why": "changes around zero"}
    return {"growth_pct_per_100_swaps": round(pct, 4), "flat": pct < target_pct}


def series_table(swaps: Sequence[int], samples: Sequence[Mapping[str, float | None]],
                 warmup: int) -> dict[str, dict[str, object]]:
    """Per series: unit, what it is, its values at each sample, its growth after warm-up (a series never
    measured, e.g. a process's GPU memory where ``nvidia-smi`` does not list it, says so). Pure."""
    names = sorted({k for s in samples for k in s})
    out: dict[str, dict[str, object]] = {}
    for name in names:
        values = [s.get(name) for s in samples]
        unit, what = SERIES_DOCS.get(name.rsplit("/", 1)[-1], ("", ""))
        growth = analyse(swaps, values, warmup) if any(v is not None for v in values) else {
            "growth_pct_per_100_swaps": None, "flat": None, "why": "not measurable here"}
        out[name] = {"unit": unit, "what": what, "values": values, **growth}
    return out
