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
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.record import command, command_args
from serving.engines import build_engine
from serving.publisher import staging
from serving.refit import CanaryConfig, RefitCoordinator
from serving.specs import BuildSpec, TensorSpec, dtype_from_name, dtype_name
from serving.weights.fastpath import FastPathConfig

GB = 1e9
FACTORY = "bench.gpu_refit:big_mlp"
MARKER_STEP = 10.0  # the marker of version k is k * MARKER_STEP; tanh outputs stay within +-1 of it


# --------------------------------------------------------------------------- the model


class BigMLP(torch.nn.Module):
    """``layers`` square Linear layers with tanh, plus a marker bias that identifies the version."""

    def __init__(self, width: int, layers: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(width, width, bias=False, device=device, dtype=dtype) for _ in range(layers))
        self.marker = torch.nn.Parameter(torch.zeros(width, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x + self.marker


def big_mlp(width: int = 1024, layers: int = 2, device: str = "cpu", dtype: str = "float16") -> BigMLP:
    """The benchmark's model, built directly on ``device`` (no host copy of a 16 GB model)."""
    return BigMLP(width, layers, device, dtype_from_name(dtype))


def shape_for(size_gb: float, dtype: torch.dtype, width: int) -> tuple[int, int]:
    """(width, layers) whose weights come to about ``size_gb``; narrower for tiny dry runs."""
    itemsize = dtype.itemsize
    while width > 64 and width * width * itemsize * 2 > size_gb * GB:
        width //= 2
    return width, max(1, round(size_gb * GB / (width * width * itemsize)))


# --------------------------------------------------------------------------- checkpoints


def write_safetensors_stream(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor (``tensors`` may repeat the same host tensor)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))


@dataclass
class Checkpoints:
    """Versions of one model: a shared layers shard, and one marker shard per version."""

    root: Path
    width: int
    layers: int
    dtype: torch.dtype
    nbytes: int
    count: int = 0
    #: the dtype the layers are stored in (None: the engine's)
    store: torch.dtype | None = None

    def publish(self, k: int) -> tuple[Path, float]:
        """Make version ``k`` appear by a rename; returns its path and the time of the rename."""
        name = f"v{k}-{self.count}"
        self.count += 1
        with staging(self.root, name, directory=True) as staged:
            os.link(self.root / "layers.safetensors", staged.temp / "layers.safetensors")
            marker = torch.full((self.width,), k * MARKER_STEP, dtype=self.dtype)
            write_safetensors_stream(staged.temp / "marker.safetensors", [("marker", marker)])
            weight_map = {f"layers.{i}.weight": "layers.safetensors" for i in range(self.layers)}
            weight_map["marker"] = "marker.safetensors"
            (staged.temp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
            staged.seal()
            t = time.perf_counter()
            final = staged.commit()
        return final, t

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def make_checkpoints(root: Path, width: int, layers: int, dtype: torch.dtype, device: str,
                     ckpt_dtype: torch.dtype | None = None) -> Checkpoints:
    """Write the layers shard once: a few distinct random layers, cycled (page cache does not care)."""
    root.mkdir(parents=True, exist_ok=True)
    store = ckpt_dtype or dtype
    gen_device = device if device != "cpu" else "cpu"
    distinct = []
    for i in range(min(layers, 4)):
        g = torch.Generator(device=gen_device).manual_seed(i)
        w = torch.randn(width, width, generator=g, device=gen_device, dtype=torch.float32) / width ** 0.5
        distinct.append(w.to(store).cpu())
    write_safetensors_stream(root / "layers.safetensors",
                             [(f"layers.{i}.weight", distinct[i % len(distinct)]) for i in range(layers)])
    nbytes = layers * width * width * dtype.itemsize + width * dtype.itemsize  # in the engine's dtype
    # read once so that the file is in the page cache (it is, having just been written; this makes sure)
    with open(root / "layers.safetensors", "rb") as f:
        while f.read(64 << 20):
            pass
    return Checkpoints(root, width, layers, dtype, nbytes, store=store)


# --------------------------------------------------------------------------- limits


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pinned_copy_seconds(nbytes: int, device: str, chunk: int = 1 << 30, repeats: int = 3) -> float:
    """Pinned host -> device of ``nbytes`` (in 1 GiB copies), median of ``repeats``; CUDA events."""
    if not device.startswith("cuda"):
        return float("nan")
    chunk = min(chunk, nbytes)
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        left = nbytes
        while left > 0:
            n = min(chunk, left)
            dst[:n].copy_(src[:n], non_blocking=True)
            left -= n
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return statistics.median(times[1:])


def page_cache_read_gbps(path: Path, threads: int, read_bytes: int, buffer_bytes: int = 1 << 30) -> float:
    """The reader threads alone: page cache -> one pinned (or plain) buffer, ``os.preadv``."""
    size = os.path.getsize(path)
    n = min(size, buffer_bytes)
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    view = memoryview(buf.numpy())  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as ex:
            best = 0.0
            for _ in range(2):
                t0 = time.perf_counter()
                done = 0
                while done < size:
                    m = min(n, size - done)
                    list(ex.map(lambda a, d=done, m=m: os.preadv(fd, [view[a:min(a + read_bytes, m)]], d + a),
                                range(0, m, read_bytes)))
                    done += m
                best = max(best, size / (time.perf_counter() - t0) / GB)
    finally:
        os.close(fd)
    return best


# --------------------------------------------------------------------------- clients


class Client:
    """Sends one request every ``interval_s`` from a thread; records when each started and how long it took."""

    def __init__(self, coord: RefitCoordinator, x: torch.Tensor, interval_s: float) -> None:
        self.coord, self.x, self.interval_s = coord, x, interval_s
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-client", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                y = self.coord.infer([self.x])[0]
                y.float().sum().item()  # wait for the answer, as a server returning it would
            except Exception:
                self.errors += 1
            self.samples.append((t0, time.perf_counter() - t0))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def during(self, windows: list[tuple[float, float]]) -> list[float]:
        return [lat for t0, lat in self.samples if any(a <= t0 + lat and t0 <= b for a, b in windows)]

    def outside(self, windows: list[tuple[float, float]]) -> list[float]:
        return [lat for t0, lat in self.samples if not any(a <= t0 + lat and t0 <= b for a, b in windows)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --------------------------------------------------------------------------- one configuration


def version_of(y: torch.Tensor) -> int:
    return round(float(y.float().mean()) / MARKER_STEP)


def timed_refit(coord: RefitCoordinator, ckpts: Checkpoints, k: int, x: torch.Tensor) -> dict[str, Any]:
    path, t_rename = ckpts.publish(k)
    report = coord.refit_from_path(path)
    t_refit = time.perf_counter()
    y = coord.infer([x])[0]
    got = version_of(y)  # .item(): the response is on the host
    t_first = time.perf_counter()
    if report.outcome != "success" or got != k:
        raise RuntimeError(f"refit to v{k}: {report.outcome} {report.reason} {report.message[:300]}; served v{got}")
    return {"version": k, "total_s": t_first - t_rename, "refit_s": t_refit - t_rename,
            "first_response_s": t_first - t_refit, "stages": dict(report.stages), "detail": dict(report.detail),
            "window": (t_rename, t_first), "report": report}


def run_config(engine_kind: str, strategy: str, ckpts: Checkpoints, device: str, repeats: int,
               fast: FastPathConfig, client_interval_s: float, prescan: bool = True,
               canary: str = "finite", ballast_bytes: int = 0) -> dict[str, Any]:
    """Serve ``ckpts``'s model with one engine and strategy; time refits from rename to first response."""
    w, layers, dtype = ckpts.width, ckpts.layers, ckpts.dtype
    file_bytes = (ckpts.root / "layers.safetensors").stat().st_size
    ckpt_dtype = ckpts.store or dtype
    spec = BuildSpec(factory=FACTORY, inputs=(TensorSpec("x", dtype, (w,)),), outputs=(TensorSpec("y", dtype, (w,)),),
                     max_batch=4, device=device, dtype=dtype,
                     factory_kwargs=(("device", device), ("dtype", dtype_name(dtype)), ("layers", layers),
                                     ("width", w)))
    out: dict[str, Any] = {"engine": engine_kind, "strategy": strategy, "size_gb": round(ckpts.nbytes / GB, 3),
                           "dtype": dtype_name(dtype), "checkpoint_dtype": dtype_name(ckpt_dtype), "width": w,
                           "layers": layers, "bytes": ckpts.nbytes, "file_bytes": file_bytes,
                           "prescan": prescan, "canary": canary, "transfer": fast.transfer}
    t0 = time.perf_counter()
    engine = build_engine(engine_kind, spec, cache=None)
    out["build_s"] = time.perf_counter() - t0
    coord = RefitCoordinator(engine, strategy=strategy, fast_path=True, fast_path_config=fast,
                             in_place_prescan=prescan, canary=CanaryConfig(canary),
                             canary_input_specs=spec.inputs)
    x = torch.randn(1, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        cold = timed_refit(coord, ckpts, 1, x)
        warm = timed_refit(coord, ckpts, 2, x)  # double buffer: the second slot comes to life here
        out["cold"] = summarize(cold)
        out["second"] = summarize(warm)
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            out["allocated_before_gb"] = torch.cuda.memory_allocated() / GB
        runs = []
        with Client(coord, x, client_interval_s) as client:
            time.sleep(0.3)  # steady samples before the first refit
            for i in range(repeats):
                runs.append(timed_refit(coord, ckpts, 3 + i, x))
                time.sleep(0.1)
            time.sleep(0.2)
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() - ballast_bytes  # what the ballast took is not the model's
            out["peak_allocated_gb"] = peak / GB
            out["peak_over_model"] = peak / ckpts.nbytes
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
        out["runs"] = [summarize(r) for r in runs]
        med = statistics.median(r["total_s"] for r in runs)
        out["total_s_median"] = med
        out["effective_gbps"] = ckpts.nbytes / med / GB
        out["stages_median"] = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs)
                                for k in runs[0]["stages"]}
        out["first_response_s_median"] = statistics.median(r["first_response_s"] for r in runs)
        out["detail_median"] = {k: statistics.median(r["detail"].get(k, 0.0) for r in runs)
                                for k in runs[0]["detail"]}
        pauses = [r["stages"].get("pause", 0.0) for r in runs]
        out["pause_ms_median"], out["pause_ms_max"] = statistics.median(pauses) * 1e3, max(pauses) * 1e3
        windows = [r["window"] for r in runs]
        during, steady = client.during(windows), client.outside(windows)
        out["client"] = {"requests": len(client.samples), "errors": client.errors,
                         "steady_p50_ms": ms(pct(steady, 0.5)), "steady_p99_ms": ms(pct(steady, 0.99)),
                         "during_refit_p50_ms": ms(pct(during, 0.5)),
                         "during_refit_max_ms": ms(max(during, default=None)),
                         "during_refit_requests": len(during)}
        out["pinned_limit_s"] = pinned_copy_seconds(ckpts.nbytes, device)
        out["pinned_gbps"] = ckpts.nbytes / out["pinned_limit_s"] / GB
        out["ratio_to_pinned_limit"] = med / out["pinned_limit_s"]
    finally:
        coord.close()
        engine.close()
        del coord, engine
        for p in ckpts.root.glob("v*"):
            shutil.rmtree(p, ignore_errors=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("window", "report")}


# --------------------------------------------------------------------------- baselines


def baselines(size_gb: float, dtype: torch.dtype, device: str, root: Path, width: int) -> dict[str, Any]:
    """The same 1 GB-class checkpoint by the host path (load to host, then transfer) and by
    ``safetensors.load_file(device=...)``, for comparison."""
    from safetensors.torch import load_file

    w, layers = shape_for(size_gb, dtype, width)
    ckpts = make_checkpoints(root, w, layers, dtype, device)
    spec = BuildSpec(factory=FACTORY, inputs=(TensorSpec("x", dtype, (w,)),), max_batch=4, device=device, dtype=dtype,
                     factory_kwargs=(("device", device), ("dtype", dtype_name(dtype)), ("layers", layers),
                                     ("width", w)))
    engine = build_engine("eager", spec, cache=None)
    coord = RefitCoordinator(engine, strategy="double_buffer", fast_path=False)
    x = torch.randn(1, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    out: dict[str, Any] = {"size_gb": size_gb, "bytes": ckpts.nbytes}
    try:
        timed_refit(coord, ckpts, 1, x)
        timed_refit(coord, ckpts, 2, x)
        runs = [timed_refit(coord, ckpts, 3 + i, x) for i in range(3)]
        med = statistics.median(r["total_s"] for r in runs)
        out["host_path_total_s"] = med
        out["host_path_gbps"] = ckpts.nbytes / med / GB
        out["host_path_stages"] = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs)
                                   for k in runs[0]["stages"]}
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


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def ballast(device: str, gb: float) -> Iterator[None]:
    """Take ``gb`` of GPU memory away, so that a model fits in place but not twice."""
    t = torch.empty(int(gb * GB), dtype=torch.uint8, device=device) if gb > 0 else None  # int(gb*GB) bytes
    try:
        yield
    finally:
        del t
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count()}
    env["commit"] = os.environ.get("HOTSWAP_COMMIT")
    try:
        env["commit"] = env["commit"] or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=p.total_memory / GB, cuda=torch.version.cuda)
    with contextlib.suppress(OSError):
        env["host_memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return env


def pick_dir(requested: str | None, need_bytes: float) -> Path:
    if requested:
        return Path(requested)
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(candidate).free > need_bytes * 1.1:
                return Path(candidate)
    return Path(tempfile.gettempdir())


def main(argv: list[str] | None = None) -> int:
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
                    "(auto, kvikio, pinned: serving.weights.transfer.TRANSFERS)")
    ap.add_argument("--task-kb", type=int, default=FastPathConfig.task_bytes >> 10, help="KvikIO's task size")
    ap.add_argument("--big-ballast", default="auto", help="GB of GPU memory to take away first (auto: enough that "
                    "the model is more than half of what is left)")
    args = ap.parse_args(argv)

    dtype = dtype_from_name(args.dtype)
    ckpt_dtype = dtype_from_name(args.checkpoint_dtype) if args.checkpoint_dtype else None
    sizes = [float(s) for s in args.sizes.split(",") if s]
    aoti_sizes = [float(s) for s in args.aoti_sizes.split(",")] if args.aoti_sizes else sizes
    fast = FastPathConfig(threads=args.threads, buffers=args.buffers, buffer_bytes=args.buffer_mb << 20,
                          read_bytes=args.read_kb << 10, task_bytes=args.task_kb << 10)
    transfers = [t for t in args.transfers.split(",") if t]
    base = pick_dir(args.dir, max(sizes + [args.big_in_place]) * GB)
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {"environment": environment(args.device),
                               "command": command("python3 -m bench.gpu_refit", given),
                               "argv": command_args(given),
                               "config": {"fast_path": fast.__dict__, "checkpoint_dir": str(base),
                                          "device": args.device}, "runs": [], "errors": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-refit-", dir=base))

    def record_error(what: str, e: BaseException) -> None:
        results["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]})
        print(f"!! {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    try:
        # limits measured once on a 1 GB file: the reader threads alone, and pinned host -> device
        try:
            probe = make_checkpoints(work / "probe", *shape_for(min([1.0, *sizes]), dtype, args.width), dtype,
                                     args.device)
            results["read_only_gbps"] = page_cache_read_gbps(probe.root / "layers.safetensors", args.threads,
                                                             args.read_kb << 10)
            results["pinned_h2d_gbps_1gib"] = (1 << 30) / pinned_copy_seconds(1 << 30, args.device) / GB \
                if args.device.startswith("cuda") else None
            shutil.rmtree(probe.root, ignore_errors=True)
        except Exception as e:
            record_error("limits", e)
        if args.baseline_gb > 0:
            try:
                results["baseline"] = baselines(args.baseline_gb, dtype, args.device, work / "baseline", args.width)
            except Exception as e:
                record_error("baseline", e)
        engines = [e for e in args.engines.split(",") if e]
        strategies = [s for s in args.strategies.split(",") if s]
        for size in sorted(set(sizes) | (set(aoti_sizes) if "aoti" in engines else set())):
            ckpts = None
            try:
                t0 = time.perf_counter()
                ckpts = make_checkpoints(work / f"ck{size}", *shape_for(size, dtype, args.width), dtype, args.device,
                                         ckpt_dtype)
                results.setdefault("write_s", {})[str(size)] = time.perf_counter() - t0
                for engine_kind in engines:
                    if size not in (aoti_sizes if engine_kind == "aoti" else sizes):
                        continue
                    for strategy, transfer in [(s, t) for s in strategies for t in transfers]:
                        what = f"{engine_kind}/{strategy}/{transfer}/{size}GB"
                        print(f".. {what}", file=sys.stderr, flush=True)
                        try:
                            r = run_config(engine_kind, strategy, ckpts, args.device, args.repeats,
                                           dataclasses.replace(fast, transfer=transfer),
                                           args.client_interval_ms / 1e3, not args.no_prescan, args.canary)
                            results["runs"].append(r)
                            print(f"   {r['effective_gbps']:.1f} GB/s effective, {r['ratio_to_pinned_limit']:.2f}x "
                                  f"the pinned limit, pause {r['pause_ms_median']:.3f} ms", file=sys.stderr,
                                  flush=True)
                        except Exception as e:
                            record_error(what, e)
            except Exception as e:
                record_error(f"checkpoint {size}GB", e)
            finally:
                if ckpts is not None:
                    shutil.rmtree(ckpts.root, ignore_errors=True)
        if args.big_in_place > 0 and args.device.startswith("cuda"):
            try:
                total = torch.cuda.get_device_properties(args.device).total_memory / GB
                free = torch.cuda.mem_get_info()[0] / GB
                if args.big_ballast == "auto":
                    # leave less than twice the model (plus 2 GB of slack for the pool and CUDA itself)
                    ballast_gb = max(0.0, free - (2 * args.big_in_place - 4))
                else:
                    ballast_gb = float(args.big_ballast)
                info = {"model_gb": args.big_in_place, "gpu_total_gb": total, "ballast_gb": ballast_gb,
                        "available_to_model_gb": total - ballast_gb}
                print(f".. big in_place {info}", file=sys.stderr, flush=True)
                big = make_checkpoints(work / "big", *shape_for(args.big_in_place, dtype, args.width), dtype,
                                       args.device)
                try:
                    with ballast(args.device, ballast_gb):
                        info["free_after_ballast_gb"] = torch.cuda.mem_get_info()[0] / GB
                        r = run_config("eager", "in_place", big, args.device, 2, fast, 0.05, not args.no_prescan,
                                       args.canary, int(ballast_gb * GB))
                finally:
                    shutil.rmtree(big.root, ignore_errors=True)
                info.update(r)
                info["model_over_half_of_available"] = args.big_in_place > info["free_after_ballast_gb"] / 2
                results["big_in_place"] = info
                print(f"   {r['effective_gbps']:.1f} GB/s effective, pause {r['pause_ms_median']:.1f} ms",
                      file=sys.stderr, flush=True)
            except Exception as e:
                record_error("big in_place", e)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = json.dumps(results, indent=2, default=str)
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
