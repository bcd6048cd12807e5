"""Publish → first response through a real Triton, by model size, beside Triton's own reload.

    python -m bench.gpu_publish --json out.json --sizes 1,4,16 --swaps 20 --baseline-swaps 3

For each size (GB, float32): the benchmark MLP (``bench.lib.models:big_mlp``: square Linear layers
with tanh, plus a marker bias that identifies the version) is served by hotswap on a ``KIND_GPU``
Python-backend instance, once per refit strategy, while clients send requests. Each new version
is a directory renamed into the watched folder (the large layers shard hard-linked between
versions, a marker shard of its own): what a user does with ``hotswap publish`` or ``mv``. Per
swap: rename → the first answer computed with the new weights that a load client gets, and the
watcher's own breakdown from the server log (settle, hash, read, validate, transfer, refit, verify,
swap; "other" is the rest: event delivery and the answer itself). Then the same model and versions
through Triton's own reload (``bench.lib.reload``: a plain model.py, explicit model control, a new
version directory and the repository load API). Reported per size: ``model_bytes``,
``publish_to_first_response_s``, the stage medians, the stream rate against the pinned-copy limit
of the same run, ``p99_during_over_steady``, ``errors``, ``torn``, peak GPU memory over the model,
latencies by swap phase, the per-request ``timeline`` (every request's start and latency, every
swap from rename to first answer), and a ``baseline`` entry with the same fields.
Targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lib.checkpoints import Sources
from bench.lib.host import MemorySampler, machine, pick_dir
from bench.lib.limits import disk_read_gbps, pinned_copy_seconds
from bench.lib.models import GB
from bench.lib.phases import latency_by_phase, phases
from bench.lib.reload import measure_reload
from bench.lib.serverlog import hashed_after, parse_summaries
from bench.lib.stats import median
from bench.lib.swapload import ClientPool, run_swap_load, timeline
from bench.lib.triton_repo import ensure_pytriton_findable, make_repository
from bench.record import command, command_args, dumps
from serving.triton.server import TritonProcess

WIDTH = 4096


def first_response(infer: Callable[[], np.ndarray], ref: np.ndarray, since: float, timeout: float,
                   atol: float) -> float:
    """Seconds from ``since`` until ``infer`` answers ``ref``."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        try:
            y = infer()
        except Exception:  # noqa: BLE001 - the load clients count failures; the probe only waits
            time.sleep(0.002)
            continue
        if y.shape == ref.shape and np.allclose(y, ref, atol=atol, rtol=0):
            return time.monotonic() - since
    raise TimeoutError(f"no answer with the new weights after {timeout}s")


def run_hotswap(work: Path, src: Sources, x: torch.Tensor, expected: dict[str, np.ndarray],
                args: argparse.Namespace) -> dict[str, Any]:
    strategies = [s for s in args.strategies.split(",") if s]
    variants = [parse_variant(v) for v in args.variant] or [("", {})]
    repo, weights_root = work / "repository", work / "weights"
    names, labels = [], []
    for variant, params in variants:
        names += make_repository(repo, src.width, src.layers, strategies, args.kind, variant=variant, params=params,
                                 version_output=not args.no_version_output)
        labels += [s if not variant else f"{s}, {variant}" for s in strategies]
    counter = iter(range(1_000_000))
    for name in names:
        (weights_root / name).mkdir(parents=True)
        src.publish(weights_root / name, "v0", f"v0-{next(counter)}")
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights_root), HOTSWAP_CACHE_DIR=str(work / "cache"))
    server = TritonProcess(repo, work_dir=work / "triton", env=env)
    results: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        server.start()
        server.wait_ready(names, args.ready_timeout)
        results["server_ready_s"] = time.monotonic() - t0
        for name, label in zip(names, labels, strict=True):
            results[label] = run_strategy(server, name, weights_root / name, src, x, expected, args, counter)
    finally:
        results["triton_log_tail"] = server.log_tail(3000)
        server.stop()
    return results


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,key=value`` -> (name, {key: value}). Pure."""
    name, _, rest = text.partition(":")
    params = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"--variant {text!r}: the name must be letters, digits or _")
    return name, params


class Answers:
    """Every request the load clients got answered, and when a version's first answer came back."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (start, latency), monotonic seconds
        self._cond = threading.Condition()
        self._want: tuple[str, float] | None = None
        self._got: float | None = None

    def __call__(self, start: float, latency: float, version: str | None) -> None:
        with self._cond:
            self.samples.append((start, latency))
            want = self._want
            if want is not None and self._got is None and version == want[0] and start + latency > want[1]:
                self._got = start + latency
                self._cond.notify_all()

    def first(self, version: str, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the end of the first answer computed with ``version`` (call before it
        can arrive, i.e. before publishing)."""
        with self._cond:
            arrived = self._cond.wait_for(lambda: self._got is not None, timeout)
            got, self._want, self._got = self._got, None, None
        if not arrived or got is None:
            raise TimeoutError(f"no answer with {version} after {timeout}s")
        return got - since

    def expect(self, version: str, since: float) -> None:
        with self._cond:
            self._want, self._got = (version, since), None


def run_strategy(server: TritonProcess, name: str, folder: Path, src: Sources, x: torch.Tensor,
                 expected: dict[str, np.ndarray], args: argparse.Namespace, counter: Iterator[int]) -> dict[str, Any]:
    """``args.swaps`` publishes into one served model under client load.

    Publish → first response is timed from the rename to the first answer with the new weights that a load
    client gets (no extra probe client: the load stays the same during swaps). A swap lasts until the
    watcher has also hashed the new version after it went live, so the next publish does not overlap it
    and the hash counts as part of the swap.
    """
    import tritonclient.grpc as grpcclient

    pool = ClientPool(lambda: grpcclient.InferenceServerClient(server.grpc_url))

    def infer() -> np.ndarray:
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        return np.asarray(pool.get().infer(name, [inp], client_timeout=120).as_numpy("Y"))

    swaps: list[dict[str, Any]] = []
    answers = Answers()

    def swap_to(version: str) -> None:
        entry = f"{version}-{next(counter)}"
        if args.cold:
            src.evict()
        answers.expect(version, time.monotonic())
        t = src.publish(folder, version, entry)
        first = answers.first(version, t, args.ready_timeout)
        hashed = hashed_after(server.log_path, entry, args.hash_timeout)
        swaps.append({"entry": entry, "publish_to_first_response_s": first, "rename_at": t,
                      "hashed_after_s": None if hashed is None else hashed - t - first})

    first_response(infer, expected["v0"], time.monotonic(), args.ready_timeout, args.atol)
    order = [f"v{1 + i % args.versions}" for i in range(args.swaps)]
    with MemorySampler(server.proc.pid if server.proc else None, gpu=args.kind == "KIND_GPU") as mem:
        try:
            r = run_swap_load(infer, expected, swap_to, order, clients=args.clients, warmup_s=3.0,
                              settle_s=0.5, cooldown_s=2.0, atol=args.atol, observe=answers)
        finally:
            pool.close()
    stages = parse_summaries(server.log_path.read_text(errors="replace"))
    for s in swaps:
        s["stages_ms"] = stages.get(s["entry"], {})
    out = summarize(r.to_json(), swaps, src.model_bytes, mem)
    out["latency_by_phase_ms"] = latency_by_phase(answers.samples, [phases(s) for s in swaps])
    out["timeline"] = timeline(answers.samples, [(s["rename_at"], s["rename_at"] + s["publish_to_first_response_s"])
                                                 for s in swaps])
    return out


def summarize(load: dict[str, Any], swaps: list[dict[str, Any]], model_bytes: int,
              mem: MemorySampler) -> dict[str, Any]:
    totals = [s["publish_to_first_response_s"] for s in swaps]
    names = sorted({k for s in swaps for k in s["stages_ms"]})
    stage_ms = {k: median([s["stages_ms"][k] for s in swaps if k in s["stages_ms"]]) for k in names}
    if stage_ms.get("total") is not None and totals:
        stage_ms["other"] = 1e3 * float(median(totals) or 0) - float(stage_ms["total"] or 0)
    streamed = [s["stages_ms"].get("read", 0) + s["stages_ms"].get("transfer", 0) for s in swaps if s["stages_ms"]]
    out = {**load, "model_bytes": model_bytes,
           "publish_to_first_response_s": {"median": median(totals), "max": max(totals, default=None),
                                           "all": totals},
           "stages_ms_median": stage_ms,
           "stream_gbps": model_bytes / (median(streamed) or float("nan")) / 1e6 if streamed else None,
           "p99_during_over_steady": load["swap_p99_ms"] / load["steady_p99_ms"] if load["steady_p99_ms"] else None,
           "peak_memory_bytes": mem.peak_bytes, "memory_before_bytes": mem.baseline_bytes,
           "peak_memory_over_model": mem.peak_bytes / model_bytes,
           "swaps_detail": swaps}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--sizes", default="1,4,16", help="model sizes in GB (float32)")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--baseline-swaps", type=int, default=3, help="Triton reloads per size (0: no baseline)")
    ap.add_argument("--versions", type=int, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--strategies", default="double_buffer")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                    help="serve one model per strategy and variant, with these config parameters, instead of "
                    "one with the defaults, e.g. threads8:weights_reader_threads=8 (repeat for more, all in one "
                    "server; a NAME alone keeps the defaults)")
    ap.add_argument("--no-version-output", action="store_true",
                    help="leave HOTSWAP_WEIGHTS_VERSION out of the config (Triton 2.51's stub under numpy 2)")
    ap.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"],
                    help="KIND_CPU: a dry run on a machine without a GPU (figures meaningless)")
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--hash-timeout", type=float, default=120.0,
                    help="how long a swap waits for the watcher's hash after going live")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--dir", help="where checkpoints are written (default: /dev/shm if it has room)")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each "
                    "publish (put --dir on a disk: tmpfs cannot be evicted); also reports the disk's read rate")
    return ap.parse_args(argv)


def measure_size(size: float, x: torch.Tensor, device: str, args: argparse.Namespace,
                 errors: list[dict[str, Any]]) -> dict[str, Any]:
    """One model size: hotswap's publishes, then Triton's own reload of the same versions; a failure is
    appended to ``errors`` (the entry keeps what was measured before it)."""
    layers = max(1, round(size * GB / (args.width * args.width * 4)))
    work = Path(tempfile.mkdtemp(prefix="gpu-publish-", dir=pick_dir(args.dir, 2 * size * GB)))
    entry: dict[str, Any] = {"size_gb": size, "width": args.width, "layers": layers}
    try:
        src = Sources(work / "sources", args.width, layers, args.versions, device)
        entry["model_bytes"] = src.model_bytes
        entry["pinned_limit_gbps"] = src.model_bytes / pinned_copy_seconds(src.model_bytes, device) / GB
        expected = src.expected(x, device)
        if args.cold:
            entry["cold"] = True
            src.evict()
            entry["disk_read_gbps"] = disk_read_gbps(src.layers_file)
        entry["hotswap"] = run_hotswap(work / "hotswap", src, x, expected, args)
        if args.baseline_swaps:
            files = {v: src.files(v) for v in src.markers}
            entry["baseline"] = measure_reload(
                work / "reload", width=args.width, layers=layers, kind=args.kind, files=files, expected=expected,
                x=x, swaps=args.baseline_swaps, clients=args.clients, atol=args.atol,
                ready_timeout=args.ready_timeout, link=True)
    except Exception as e:  # the JSON keeps the failure; the next size still runs
        errors.append({"size_gb": size, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-4000:]})
        print(f"!! {size} GB: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop the servers
    ensure_pytriton_findable()
    given = sys.argv[1:] if argv is None else argv
    device = "cuda" if args.kind == "KIND_GPU" else "cpu"
    results: dict[str, Any] = {"environment": machine(device),
                               "command": command("python3 -m bench.gpu_publish", given),
                               "argv": command_args(given),
                               "sizes": [], "errors": []}
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(7))
    for size in [float(s) for s in args.sizes.split(",") if s]:
        entry = measure_size(size, x, device, args, results["errors"])
        results["sizes"].append(entry)
        print(json.dumps(brief(entry), default=str), flush=True)
        if args.json:  # after every size: a time limit does not lose the sizes done
            Path(args.json).write_text(dumps(results))
    return 1 if results["errors"] else 0


def brief(entry: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one size (what the README table shows)."""
    out: dict[str, Any] = {"size_gb": entry["size_gb"], "pinned_limit_gbps": entry.get("pinned_limit_gbps")}
    for strategy, r in entry.get("hotswap", {}).items():
        if isinstance(r, dict):
            out[strategy] = {k: r.get(k) for k in ("publish_to_first_response_s", "stages_ms_median", "stream_gbps",
                                                  "p99_during_over_steady", "errors", "torn",
                                                  "peak_memory_over_model")}
            out[strategy]["publish_to_first_response_s"] = r["publish_to_first_response_s"]["median"]
    b = entry.get("baseline")
    if b:
        out["baseline"] = {"publish_to_first_response_s": b["publish_to_first_response_s"]["median"],
                           "errors": b["errors"], "torn": b["torn"],
                           "p99_during_over_steady": b["p99_during_over_steady"],
                           "peak_memory_over_model": b["peak_memory_over_model"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
