"""GPU refit benchmark: from a checkpoint's rename to the first response served with it.

    python -m bench.gpu_refit --json out.json --sizes 1,4,16 --dtype float16 --engines eager,aoti

For each engine, strategy and size: a model of a few large Linear layers (weights dominate, an
AOTInductor compile stays quick) is served by a :class:`RefitCoordinator` on the fast path; a new
version is published by renaming a directory into place (a sharded checkpoint: the big layers'
shard is hard-linked between versions, each version has its own small marker shard), then
``refit_from_path`` runs and one request is answered; the answer must carry the new marker.
Reported beside it, from the same run: the pinned-copy limit (the same bytes copied from pinned
host memory to the device), the page-cache read rate of the reader threads alone, the peak GPU
memory over the model size for each strategy, the swap pause (how long requests are held), and
what a client thread sending requests during the refits saw. ``--big-in-place`` adds an in-place
run of a model larger than half the GPU memory available to it.

Targets are reported, not asserted. ``--device cpu --sizes 0.01`` is a dry run for machines
without a GPU (figures meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.lib.checkpoints import Checkpoints, make_checkpoints, remove_versions
from bench.lib.clients import IntervalClient
from bench.lib.host import machine, pick_dir
from bench.lib.limits import page_cache_read_gbps, pinned_copy_seconds, sync
from bench.lib.models import FACTORY, GB, shape_for, version_of
from bench.lib.stats import percentile
from bench.record import command, command_args, dumps
from serving.engines import build_engine
from serving.refit import CanaryConfig, RefitCoordinator
from serving.specs import BuildSpec, TensorSpec, dtype_from_name, dtype_name
from serving.weights.fastpath import FastPathConfig

RecordError = Callable[[str, BaseException], None]


def mlp_spec(width: int, layers: int, dtype: torch.dtype, device: str) -> BuildSpec:
    return BuildSpec(factory=FACTORY, inputs=(TensorSpec("x", dtype, (width,)),),
                     outputs=(TensorSpec("y", dtype, (width,)),), max_batch=4, device=device, dtype=dtype,
                     factory_kwargs=(("device", device), ("dtype", dtype_name(dtype)), ("layers", layers),
                                     ("width", width)))


def timed_refit(coord: RefitCoordinator, ckpts: Checkpoints, k: int, x: torch.Tensor) -> dict[str, Any]:
    """Publish version ``k``, refit from it, answer one request with it; the times from the rename."""
    path, t_rename = ckpts.publish(k)
    report = coord.refit_from_path(path)
    t_refit = time.perf_counter()
    got = version_of(coord.infer([x])[0])  # .item(): the response is on the host
    t_first = time.perf_counter()
    if report.outcome != "success" or got != k:
        raise RuntimeError(f"refit to v{k}: {report.outcome} {report.reason} {report.message[:300]}; served v{got}")
    return {"version": k, "total_s": t_first - t_rename, "refit_s": t_refit - t_rename,
            "first_response_s": t_first - t_refit, "stages": dict(report.stages), "detail": dict(report.detail),
            "window": (t_rename, t_first), "report": report}


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("window", "report")}


def medians(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {k: statistics.median(r[key].get(k, 0.0) for r in runs) for k in runs[0][key]}


def client_figures(client: IntervalClient, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """What the client thread saw: requests outside the refits and during them."""
    during, steady = client.during(windows), client.outside(windows)
    return {"requests": len(client.samples), "errors": client.errors,
            "steady_p50_ms": ms(percentile(steady, 50)), "steady_p99_ms": ms(percentile(steady, 99)),
            "during_refit_p50_ms": ms(percentile(during, 50)),
            "during_refit_max_ms": ms(max(during, default=None)), "during_refit_requests": len(during)}


def timed_runs(coord: RefitCoordinator, ckpts: Checkpoints, x: torch.Tensor, repeats: int, device: str,
               client_interval_s: float, ballast_bytes: int, out: dict[str, Any]) -> None:
    """Two refits to bring both slots to life, then ``repeats`` timed ones with a client sending requests."""
    out["cold"] = summarize(timed_refit(coord, ckpts, 1, x))
    out["second"] = summarize(timed_refit(coord, ckpts, 2, x))  # double buffer: the second slot comes to life
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        out["allocated_before_gb"] = torch.cuda.memory_allocated() / GB
    runs = []
    with IntervalClient(coord, x, client_interval_s) as client:
        time.sleep(0.3)  # steady samples before the first refit
        for i in range(repeats):
            runs.append(timed_refit(coord, ckpts, 3 + i, x))
            time.sleep(0.1)
        time.sleep(0.2)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - ballast_bytes  # what the ballast took is not the model's
        out.update(peak_allocated_gb=peak / GB, peak_over_model=peak / ckpts.nbytes,
                   peak_reserved_gb=torch.cuda.max_memory_reserved() / GB)
    med = statistics.median(r["total_s"] for r in runs)
    pauses = [r["stages"].get("pause", 0.0) for r in runs]
    out.update(runs=[summarize(r) for r in runs], total_s_median=med, effective_gbps=ckpts.nbytes / med / GB,
               stages_median=medians(runs, "stages"),
               first_response_s_median=statistics.median(r["first_response_s"] for r in runs),
               detail_median=medians(runs, "detail"), pause_ms_median=statistics.median(pauses) * 1e3,
               pause_ms_max=max(pauses) * 1e3, client=client_figures(client, [r["window"] for r in runs]))
    out["pinned_limit_s"] = pinned_copy_seconds(ckpts.nbytes, device)
    out["pinned_gbps"] = ckpts.nbytes / out["pinned_limit_s"] / GB
    out["ratio_to_pinned_limit"] = med / out["pinned_limit_s"]


def run_config(engine_kind: str, strategy: str, ckpts: Checkpoints, device: str, repeats: int,
               fast: FastPathConfig, client_interval_s: float, prescan: bool = True,
               canary: str = "finite", ballast_bytes: int = 0) -> dict[str, Any]:
    """Serve ``ckpts``'s model with one engine and strategy; time refits from rename to first response."""
    w, layers, dtype = ckpts.width, ckpts.layers, ckpts.dtype
    spec = mlp_spec(w, layers, dtype, device)
    out: dict[str, Any] = {"engine": engine_kind, "strategy": strategy, "size_gb": round(ckpts.nbytes / GB, 3),
                           "dtype": dtype_name(dtype), "checkpoint_dtype": dtype_name(ckpts.store or dtype),
                           "width": w, "layers": layers, "bytes": ckpts.nbytes,
                           "file_bytes": (ckpts.root / "layers.safetensors").stat().st_size,
                           "prescan": prescan, "canary": canary, "transfer": fast.transfer}
    t0 = time.perf_counter()
    engine = build_engine(engine_kind, spec, cache=None)
    out["build_s"] = time.perf_counter() - t0
    coord = RefitCoordinator(engine, strategy=strategy, fast_path=True, fast_path_config=fast,
                             in_place_prescan=prescan, canary=CanaryConfig(canary),
                             canary_input_specs=spec.inputs)
    x = torch.randn(1, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        timed_runs(coord, ckpts, x, repeats, device, client_interval_s, ballast_bytes, out)
        for choice in coord.transfers.values():  # what `transfer` (e.g. auto) came to on the device, and why
            out.update(transfer_used=choice.kind, transfer_reason=choice.reason, gds=choice.gds)
    finally:
        coord.close()
        engine.close()
        del coord, engine
        remove_versions(ckpts.root)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def baselines(size_gb: float, dtype: torch.dtype, device: str, root: Path, width: int) -> dict[str, Any]:
    """The same 1 GB-class checkpoint by the host path (load to host, then transfer) and by
    ``safetensors.load_file(device=...)``, for comparison."""
    from safetensors.torch import load_file

    w, layers = shape_for(size_gb, dtype, width)
    ckpts = make_checkpoints(root, w, layers, dtype, device)
    engine = build_engine("eager", mlp_spec(w, layers, dtype, device), cache=None)
    coord = RefitCoordinator(engine, strategy="double_buffer", fast_path=False)
    x = torch.randn(1, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    out: dict[str, Any] = {"size_gb": size_gb, "bytes": ckpts.nbytes}
    try:
        timed_refit(coord, ckpts, 1, x)
        timed_refit(coord, ckpts, 2, x)
        runs = [timed_refit(coord, ckpts, 3 + i, x) for i in range(3)]
        med = statistics.median(r["total_s"] for r in runs)
        out.update(host_path_total_s=med, host_path_gbps=ckpts.nbytes / med / GB,
                   host_path_stages=medians(runs, "stages"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sd = load_file(str(root / "layers.safetensors"), device=device)
            sync(device)
            times.append(time.perf_counter() - t0)
            del sd
        out["safetensors_load_file_s"] = statistics.median(times)
        out["safetensors_load_file_gbps"] = (ckpts.nbytes - w * dtype.itemsize) / statistics.median(times) / GB
    finally:
        coord.close()
        engine.close()
        shutil.rmtree(root, ignore_errors=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def ballast(device: str, gb: float) -> Iterator[None]:
    """Take ``gb`` of GPU memory away, so that a model fits in place but not twice."""
    t = torch.empty(int(gb * GB), dtype=torch.uint8, device=device) if gb > 0 else None
    try:
        yield
    finally:
        del t
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure_limits(results: dict[str, Any], args: argparse.Namespace, work: Path, dtype: torch.dtype,
                   sizes: list[float], record_error: RecordError) -> None:
    """Limits measured once on a 1 GB file: the reader threads alone, pinned host -> device."""
    probe = make_checkpoints(work / "probe", *shape_for(min([1.0, *sizes]), dtype, args.width), dtype, args.device)
    results["read_only_gbps"] = page_cache_read_gbps(probe.root / "layers.safetensors", args.threads,
                                                     args.read_kb << 10)
    results["pinned_h2d_gbps_1gib"] = (1 << 30) / pinned_copy_seconds(1 << 30, args.device) / GB \
        if args.device.startswith("cuda") else None
    shutil.rmtree(probe.root, ignore_errors=True)


def run_sizes(results: dict[str, Any], args: argparse.Namespace, work: Path, fast: FastPathConfig,
              record_error: RecordError) -> None:
    """Every engine, strategy and transfer at every size (aoti at ``--aoti-sizes``)."""
    dtype = dtype_from_name(args.dtype)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    aoti_sizes = [float(s) for s in args.aoti_sizes.split(",")] if args.aoti_sizes else sizes
    engines = [e for e in args.engines.split(",") if e]
    configs = [(s, t) for s in args.strategies.split(",") if s for t in args.transfers.split(",") if t]
    for size in sorted(set(sizes) | (set(aoti_sizes) if "aoti" in engines else set())):
        ckpts = None
        try:
            t0 = time.perf_counter()
            ckpts = make_checkpoints(work / f"ck{size}", *shape_for(size, dtype, args.width), dtype, args.device,
                                     dtype_from_name(args.checkpoint_dtype) if args.checkpoint_dtype else None)
            results.setdefault("write_s", {})[str(size)] = time.perf_counter() - t0
            for engine_kind in engines:
                if size not in (aoti_sizes if engine_kind == "aoti" else sizes):
                    continue
                for strategy, transfer in configs:
                    what = f"{engine_kind}/{strategy}/{transfer}/{size}GB"
                    print(f".. {what}", file=sys.stderr, flush=True)
                    try:
                        r = run_config(engine_kind, strategy, ckpts, args.device, args.repeats,
                                       dataclasses.replace(fast, transfer=transfer), args.client_interval_ms / 1e3,
                                       not args.no_prescan, args.canary)
                        results["runs"].append(r)
                        print(f"   {r['effective_gbps']:.1f} GB/s effective, {r['ratio_to_pinned_limit']:.2f}x "
                              f"the pinned limit, pause {r['pause_ms_median']:.3f} ms", file=sys.stderr, flush=True)
                    except Exception as e:
                        record_error(what, e)
        except Exception as e:
            record_error(f"checkpoint {size}GB", e)
        finally:
            if ckpts is not None:
                shutil.rmtree(ckpts.root, ignore_errors=True)


def run_big_in_place(args: argparse.Namespace, work: Path, fast: FastPathConfig) -> dict[str, Any]:
    """In place, with a model larger than half the GPU memory left to it (a ballast takes the rest)."""
    dtype = dtype_from_name(args.dtype)
    total = torch.cuda.get_device_properties(args.device).total_memory / GB
    free = torch.cuda.mem_get_info()[0] / GB
    # auto: leave less than twice the model (plus 2 GB of slack for the pool and CUDA itself)
    ballast_gb = max(0.0, free - (2 * args.big_in_place - 4)) if args.big_ballast == "auto" \
        else float(args.big_ballast)
    info: dict[str, Any] = {"model_gb": args.big_in_place, "gpu_total_gb": total, "ballast_gb": ballast_gb,
                            "available_to_model_gb": total - ballast_gb}
    print(f".. big in_place {info}", file=sys.stderr, flush=True)
    big = make_checkpoints(work / "big", *shape_for(args.big_in_place, dtype, args.width), dtype, args.device)
    try:
        with ballast(args.device, ballast_gb):
            info["free_after_ballast_gb"] = torch.cuda.mem_get_info()[0] / GB
            r = run_config("eager", "in_place", big, args.device, 2, fast, 0.05, not args.no_prescan, args.canary,
                           int(ballast_gb * GB))
    finally:
        shutil.rmtree(big.root, ignore_errors=True)
    info.update(r)
    info["model_over_half_of_available"] = args.big_in_place > info["free_after_ballast_gb"] / 2
    print(f"   {r['effective_gbps']:.1f} GB/s effective, pause {r['pause_ms_median']:.1f} ms", file=sys.stderr,
          flush=True)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write the results here (- for stdout)")
    ap.add_argument("--sizes", default="1,4,16", help="checkpoint sizes in GB, comma separated")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--checkpoint-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="store the checkpoint in another dtype (cast on the device)")
    ap.add_argument("--engines", default="eager,aoti")
    ap.add_argument("--strategies", default="double_buffer,in_place")
    ap.add_argument("--aoti-sizes", default=None, help="sizes for the aoti engine (default: --sizes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: /dev/shm if it has room)")
    ap.add_argument("--threads", type=int, default=FastPathConfig.threads)
    ap.add_argument("--buffers", type=int, default=FastPathConfig.buffers)
    ap.add_argument("--buffer-mb", type=int, default=FastPathConfig.buffer_bytes >> 20)
    ap.add_argument("--read-kb", type=int, default=FastPathConfig.read_bytes >> 10)
    ap.add_argument("--canary", default="finite", choices=["off", "finite"],
                    help="the canary run before a swap (the eager engine's default is finite)")
    ap.add_argument("--no-prescan", action="store_true", help="in place: skip the read-and-check pass")
    ap.add_argument("--client-interval-ms", type=float, default=20.0)
    ap.add_argument("--baseline-gb", type=float, default=1.0, help="size of the host-path baseline (0: skip)")
    ap.add_argument("--big-in-place", type=float, default=0.0, metavar="GB",
                    help="also run in_place with a model of this size (0: skip)")
    ap.add_argument("--transfers", default="pinned", help="weights transfers to run, comma separated "
                    "(auto, kvikio, pinned: serving.choices.TRANSFERS)")
    ap.add_argument("--task-kb", type=int, default=FastPathConfig.task_bytes >> 10, help="KvikIO's task size")
    ap.add_argument("--big-ballast", default="auto", help="GB of GPU memory to take away first (auto: enough that "
                    "the model is more than half of what is left)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    fast = FastPathConfig(threads=args.threads, buffers=args.buffers, buffer_bytes=args.buffer_mb << 20,
                          read_bytes=args.read_kb << 10, task_bytes=args.task_kb << 10)
    base = pick_dir(args.dir, max(sizes + [args.big_in_place]) * GB)
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {"environment": machine(args.device),
                               "command": command("python3 -m bench.gpu_refit", given),
                               "argv": command_args(given),
                               "config": {"fast_path": fast.__dict__, "checkpoint_dir": str(base),
                                          "device": args.device}, "runs": [], "errors": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-refit-", dir=base))

    def record_error(what: str, e: BaseException) -> None:
        results["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]})
        print(f"!! {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def attempt(what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as e:
            record_error(what, e)

    try:
        attempt("limits", lambda: measure_limits(results, args, work, dtype_from_name(args.dtype), sizes,
                                                 record_error))
        if args.baseline_gb > 0:
            attempt("baseline", lambda: results.update(baseline=baselines(
                args.baseline_gb, dtype_from_name(args.dtype), args.device, work / "baseline", args.width)))
        run_sizes(results, args, work, fast, record_error)
        if args.big_in_place > 0 and args.device.startswith("cuda"):
            attempt("big in_place", lambda: results.update(big_in_place=run_big_in_place(args, work, fast)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = dumps(results)
    if args.json == "-":
        print(text)
    elif args.json:
        Path(args.json).write_text(text)
    print_table(results)
    return 1 if results["errors"] else 0


def print_table(results: dict[str, Any]) -> None:
    env = results["environment"]
    print(f"\n{env.get('gpu', 'cpu')} torch {env['torch']} {env['date']} commit {env.get('commit')}")
    print(f"reader threads alone: {results.get('read_only_gbps')} GB/s; pinned H2D: "
          f"{results.get('pinned_h2d_gbps_1gib')} GB/s")
    print(f"{'engine':7} {'strategy':13} {'transfer':10} {'GB':>5} {'total ms':>9} {'GB/s':>6} {'limit ms':>9} "
          f"{'x lim':>6} "
          f"{'pause ms':>9} {'peak/model':>10} {'client max ms':>13}")
    rows = list(results["runs"])
    if "big_in_place" in results and "runs" in results["big_in_place"]:
        rows.append(results["big_in_place"])
    for r in rows:
        print(f"{r['engine']:7} {r['strategy']:13} {r.get('transfer', 'pinned'):10} {r['bytes'] / GB:5.1f} "
              f"{r['total_s_median'] * 1e3:9.1f} "
              f"{r['effective_gbps']:6.1f} {r['pinned_limit_s'] * 1e3:9.1f} {r['ratio_to_pinned_limit']:6.2f} "
              f"{r['pause_ms_median']:9.3f} {r.get('peak_over_model', float('nan')):10.2f} "
              f"{r['client']['during_refit_max_ms'] or float('nan'):13.1f}")
    for e in results["errors"]:
        print(f"ERROR {e['what']}: {e['error']}")


if __name__ == "__main__":
    sys.exit(main())
