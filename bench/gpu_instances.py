"""Several instances of one model on one GPU: rename → every instance serving the new version, and the bytes
each instance read to install it (the baseline for reading a checkpoint once per host).

    python3 -m bench.gpu_instances --json $OUT/gpu-instances-h200.json --size-gb 16 --instances 1,2 --swaps 3

For each instance count: one server with ``instance_group [ { count: N, kind: KIND_GPU } ]`` serving the benchmark
MLP (``bench.lib.models:big_mlp``, float32, double buffer, the default weight transfer). Each new version is a
directory renamed into the watched folder (as in ``bench/gpu_publish.py``). Per swap: the seconds from the rename
until each instance reports the version live on Triton's metrics endpoint (``hotswap_weights_info``, polled),
and, per stub process, the bytes it read from files (``rchar`` of ``/proc/PID/io``: page cache or disk alike)
until every instance was live, and until every instance had also hashed the version (the watcher reads it once
more for its content identity). No client load: this measures the reads, not request latency.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.lib.checkpoints import Sources
from bench.lib.host import machine, pick_dir
from bench.lib.models import GB
from bench.lib.stats import median
from bench.lib.triton_repo import ensure_pytriton_findable, make_repository
from bench.record import command, command_args, dumps
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess

WIDTH = 4096


def stub_pids(server_pid: int) -> list[int]:
    """The Python-backend stub processes under the server (one per model instance)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = re.search(r"^PPid:\s+(\d+)", status, re.M)
        if ppid and int(ppid.group(1)) == server_pid and b"triton_python_backend_stub" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def read_bytes(pid: int) -> int:
    """Bytes the process has read through read-like calls so far (``rchar``)."""
    m = re.search(r"^rchar:\s+(\d+)", Path(f"/proc/{pid}/io").read_text(), re.M)
    return int(m.group(1)) if m else 0


def wait_live(metrics_url: str, model: str, version: str, instances: int, since: float,
              timeout: float) -> dict[str, float]:
    """instance -> seconds from ``since`` until the endpoint first showed ``version`` live there."""
    seen: dict[str, float] = {}
    deadline = since + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        for instance, live in weights_versions(scrape(metrics_url), model).items():
            if live == version and instance not in seen:
                seen[instance] = now - since
        if len(seen) >= instances:
            return seen
        time.sleep(0.01)
    raise TimeoutError(f"{version} live on {sorted(seen)} of {instances} instances after {timeout}s")


def wait_hashed(log: Path, entry: str, instances: int, timeout: float) -> bool:
    """Whether every instance logged hashing ``entry`` after it went live (or hashed it before: then no line)."""
    pattern = re.compile(re.escape(entry) + r" hashed after it went live")
    summary = re.compile(r"refit " + re.escape(entry) + r" -> [^\n]*")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        later = sum("hashed after going live" in m.group(0) for m in summary.finditer(text))
        if len(summary.findall(text)) >= instances and len(pattern.findall(text)) >= later:
            return True
        time.sleep(0.05)
    return False


def run_count(work: Path, src: Sources, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One server serving the model on ``n`` instances; ``args.swaps`` versions published into it."""
    repo, weights = work / "repository", work / "weights"
    (name,) = make_repository(repo, src.width, src.layers, ["double_buffer"], args.kind, version_output=False)
    config = repo / name / "config.pbtxt"
    text, count = re.subn(r"count: 1,", f"count: {n},", config.read_text())
    assert count == 1, "the benchmark repository no longer declares one instance"
    config.write_text(text)
    (weights / name).mkdir(parents=True)
    src.publish(weights / name, "v0", "v0-0")
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights), HOTSWAP_CACHE_DIR=str(work / "cache"))
    server = TritonProcess(repo, work_dir=work / "triton", env=env)
    out: dict[str, Any] = {"instances": n, "swaps": []}
    try:
        t0 = time.monotonic()
        server.start()
        server.wait_ready([name], args.ready_timeout)
        out["server_ready_s"] = time.monotonic() - t0
        assert server.proc is not None
        pids = stub_pids(server.proc.pid)
        out["stub_processes"] = len(pids)
        for k in range(1, args.swaps + 1):
            version, entry = f"v{k}", f"v{k}-{k}"
            before = {p: read_bytes(p) for p in pids}
            t = src.publish(weights / name, version, entry)
            live = wait_live(server.metrics_url, name, entry, n, t, args.ready_timeout)
            at_live = {p: read_bytes(p) - before[p] for p in pids}
            hashed = wait_hashed(server.log_path, entry, n, args.ready_timeout)
            at_hash = {p: read_bytes(p) - before[p] for p in pids}
            out["swaps"].append({"entry": entry, "live_s": live, "all_live_s": max(live.values()),
                                 "read_until_live_bytes": sum(at_live.values()),
                                 "read_until_hashed_bytes": sum(at_hash.values()) if hashed else None,
                                 "read_by_process_until_live": list(at_live.values())})
        all_live = [s["all_live_s"] for s in out["swaps"]]
        out["all_live_s"] = {"median": median(all_live), "max": max(all_live, default=None)}
        out["read_until_live_over_model"] = median([s["read_until_live_bytes"] / src.model_bytes
                                                    for s in out["swaps"]])
        hashed_reads = [s["read_until_hashed_bytes"] for s in out["swaps"] if s["read_until_hashed_bytes"]]
        out["read_until_hashed_over_model"] = median([b / src.model_bytes for b in hashed_reads])
    finally:
        out["triton_log_tail"] = server.log_tail(2000)
        server.stop()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--size-gb", type=float, default=16.0, help="model size in GB (float32)")
    ap.add_argument("--instances", default="1,2", help="instance counts, each in a server of its own")
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"],
                    help="KIND_CPU: a dry run on a machine without a GPU (figures meaningless)")
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--dir", help="where checkpoints are written (default: /dev/shm if it has room)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop the server
    ensure_pytriton_findable()
    given = sys.argv[1:] if argv is None else argv
    device = "cuda" if args.kind == "KIND_GPU" else "cpu"
    layers = max(1, round(args.size_gb * GB / (args.width * args.width * 4)))
    results: dict[str, Any] = {"environment": machine(device),
                               "command": command("python3 -m bench.gpu_instances", given),
                               "argv": command_args(given), "size_gb": args.size_gb, "width": args.width,
                               "layers": layers, "counts": [], "errors": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-instances-", dir=pick_dir(args.dir, 2 * args.size_gb * GB)))
    try:
        src = Sources(work / "sources", args.width, layers, args.swaps, device)
        results["model_bytes"] = src.model_bytes
        for n in [int(c) for c in args.instances.split(",") if c]:
            try:
                results["counts"].append(run_count(work / f"n{n}", src, n, args))
            except Exception as e:  # the JSON keeps the failure; the next count still runs
                results["errors"].append({"instances": n, "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()[-4000:]})
            if args.json:
                Path(args.json).write_text(dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for c in results["counts"]:
        print(f"{c['instances']} instance(s): every one live in {c['all_live_s']['median']:.3f} s (median), "
              f"read {c['read_until_live_over_model']:.2f}x the model until live", flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
