"""File -> preallocated tensors, side by side in one process: our readers, KvikIO, and the libraries people use.

    python3 -m bench.loaders --json $OUT/loaders-h200.json            # on a GPU: a 16 GB fp16 file, every loader
    python3 -m bench.loaders --dry-run --json /tmp/loaders.json        # anywhere: 16 MB on the CPU

One safetensors file is written (random values; a checksum of every tensor taken as it is written) and left in the
page cache. Destination tensors are allocated once on the device. For each loader, each run: every destination is
zeroed, the file is loaded into the destinations, the device synchronized, and every destination checked against
the checksums; meanwhile a request thread serves small requests back to back and records their latency. A
request is what a served model does per call: 256 KB copied from host memory to the device, a 4096 x 4096 fp16
matmul, 16 KB copied back (on the CPU a 128 x 128 float32 matmul, with what fits of those sizes). One row per
loader (``rows``, the shape
``bench/render`` reads): GB/s (median of the runs), process CPU seconds per GB (the request thread's own CPU time
taken out), request p50/p99 during its loads and the steady p99 measured without a load (before and after all
of them), and whether every tensor came back right. In the same run: the pinned host -> device copy limit.

Loaders (``--loaders``, comma separated; default all): ``pinned-tN`` (our pinned ring, N threads; our threads
straight into host memory when the device is the CPU), ``kvikio-tN-mM`` (our reader through KvikIO, N threads,
M MiB tasks), ``fastsafetensors`` (``fastsafe_open(..., nogds=True)``, then a copy into the destinations),
``runai`` (the Run:ai streamer's ``SafetensorsStreamer``, then a copy), ``safe_open`` (``safe_open(device=...)``,
then a copy). A loader whose library is missing is recorded in ``skipped``, with the reason; one that fails, in
``errors``, with its error. It needs torch, safetensors and this repository.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from bench.lib.host import machine
from bench.lib.limits import pinned_copy_seconds
from bench.lib.stats import percentile
from bench.record import command, write_json
from serving.specs import WeightSpec
from serving.weights.fastpath import FastPathConfig, FastReader, read_checkpoint_into
from serving.weights.kvikio_reader import load_kvikio
from serving.weights.loader import open_checkpoint

GB = 1e9
MiB = 1 << 20
THREADS = (4, 8, 16)
TASKS_MIB = (4, 16)
ALL = ([f"pinned-t{n}" for n in THREADS] + [f"kvikio-t{n}-m{m}" for n in THREADS for m in TASKS_MIB]
       + ["fastsafetensors", "runai", "safe_open"])
ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}

Dest = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- the file and its checksums


def checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two sums over the tensor's 32-bit words: all of them, and every seventh from the second (catches shifts)."""
    words = t.detach().reshape(-1).view(torch.int32)
    return int(words.sum(dtype=torch.int64)), int(words[1::7].sum(dtype=torch.int64))


def write_checkpoint(path: Path, count: int, numel: int, dtype: torch.dtype, device: str) -> dict[str, tuple[int, int]]:
    """A safetensors file of ``count`` tensors of ``numel`` elements (random, made on ``device``); their checksums."""
    names = [f"layers.{i}.weight" for i in range(count)]
    nbytes = numel * dtype.itemsize
    header: dict[str, Any] = {n: {"dtype": ST_DTYPES[dtype], "shape": [numel],
                                  "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i, n in enumerate(names)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    sums = {}
    g = torch.Generator(device=device).manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for n in names:
            t = torch.randn(numel, generator=g, device=device).to(dtype)
            sums[n] = checksum(t)
            f.write(t.cpu().view(torch.uint8).numpy().data)
    return sums


def mismatched(dest: Dest, sums: dict[str, tuple[int, int]]) -> list[str]:
    """Destination tensors whose checksum differs from the one taken when the file was written."""
    return [n for n, s in sums.items() if checksum(dest[n]) != s]


# --------------------------------------------------------------------------- loaders


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Loader:
    """``load(path, dest)`` fills ``dest`` from the file and returns what to record; ``close()`` frees.
    ``settings`` go into the loader's row (``threads`` and ``task_bytes``: None where the library decides)."""

    name: str
    library: str
    load: Callable[[Path, Dest], dict[str, Any]]
    why_not: Callable[[], str | None] = lambda: None
    close: Callable[[], None] = lambda: None
    settings: dict[str, Any] = field(default_factory=dict)


def _imports(module: str) -> Callable[[], str | None]:
    def why_not() -> str | None:
        try:
            importlib.import_module(module)
        except Exception as e:  # a library that does not load here is skipped, not a crash
            return f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return None
    return why_not


def ours(name: str, config: FastPathConfig, device: str) -> Loader:
    reader = FastReader(config)
    specs: dict[str, WeightSpec] = {}

    def load(path: Path, dest: Dest) -> dict[str, Any]:
        if not specs:
            specs.update({n: WeightSpec(n, tuple(t.shape), t.dtype) for n, t in dest.items()})
        checked = open_checkpoint(path, specs)
        stats = read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, dest, reader=reader)
        choice = next(iter(reader.choices.values()), None)
        return {"transfer": stats.transfer, "gds": bool(choice and choice.gds),
                "transfer_reason": choice.reason if choice else ""}

    def why_not() -> str | None:
        if config.transfer != "kvikio":
            return None
        module, why = load_kvikio()
        return None if module is not None else why

    settings = {"threads": config.threads, "task_bytes": config.task_bytes if config.transfer == "kvikio" else None,
                "transfer": config.transfer}
    return Loader(name, "hotswap", load, why_not, reader.close, settings)


def fastsafetensors_loader(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, Any]:
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=[str(path)], device=device, nogds=True) as f:
            for n, t in dest.items():
                t.copy_(f.get_tensor(n))
            _sync(device)  # the copies out of its buffer are done before it frees it
        return {}

    return Loader("fastsafetensors", "fastsafetensors", load, _imports("fastsafetensors"), settings={"nogds": True})


def runai_loader(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, Any]:
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(path))
            for n, t in streamer.get_tensors():
                dest[n].copy_(t)
            _sync(device)
        return {}

    concurrency = os.environ.get("RUNAI_STREAMER_CONCURRENCY", "library default")
    return Loader("runai", "runai_model_streamer", load, _imports("runai_model_streamer"),
                  settings={"concurrency": concurrency})


def safe_open_loader(device: str) -> Loader:
    def load(path: Path, dest: Dest) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=device) as f:
            for n, t in dest.items():
                t.copy_(f.get_tensor(n))
        return {}

    return Loader("safe_open", "safetensors", load, _imports("safetensors"), settings={"device": device})


def make_loader(name: str, device: str) -> Loader:
    parts = name.split("-")
    if parts[0] == "pinned" and len(parts) == 2:
        return ours(name, FastPathConfig(threads=int(parts[1][1:]), transfer="pinned"), device)
    if parts[0] == "kvikio" and len(parts) == 3:
        return ours(name, FastPathConfig(threads=int(parts[1][1:]), task_bytes=int(parts[2][1:]) * MiB,
                                         transfer="kvikio"), device)
    makers = {"fastsafetensors": fastsafetensors_loader, "runai": runai_loader, "safe_open": safe_open_loader}
    if name not in makers:
        raise ValueError(f"unknown loader {name!r}: pinned-tN, kvikio-tN-mM, {', '.join(makers)}")
    return makers[name](device)


# --------------------------------------------------------------------------- the request thread


class Requests:
    """Small requests back to back on a thread: (start, latency) per request, and the thread's CPU time."""

    def __init__(self, device: str, gap_s: float = 0.0) -> None:
        self.device, self.gap_s = device, gap_s
        n = 4096 if device.startswith("cuda") else 128
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        row_bytes = n * torch.finfo(dtype).bits // 8
        rows_in = min(n, max(1, (256 << 10) // row_bytes))  # 256 KB in (on the CPU, what fits)
        rows_out = min(n, max(1, (16 << 10) // row_bytes))  # 16 KB out
        self.x_host = torch.randn(rows_in, n, dtype=dtype)  # pageable, as a request's input is
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.w = torch.randn(n, n, device=device, dtype=dtype)
        self.rows_out = rows_out
        self.samples: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []  # (perf_counter, thread_time) after each request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-requests", daemon=True)

    def _run(self) -> None:
        rows_in = self.x_host.shape[0]
        while not self._stop.is_set():
            t = time.perf_counter()
            self.a[:rows_in].copy_(self.x_host)  # the input reaches the device
            out = (self.a @ self.w)[:self.rows_out].cpu()  # the answer copied to the host
            done = time.perf_counter()
            del out
            self.samples.append((t, done - t))
            self.cpu.append((done, time.thread_time()))
            if self.gap_s:
                time.sleep(self.gap_s)

    def __enter__(self) -> Requests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def during(self, t0: float, t1: float) -> list[float]:
        return [lat for s, lat in self.samples if s <= t1 and s + lat >= t0]

    def cpu_between(self, t0: float, t1: float) -> float:
        inside = [c for t, c in self.cpu if t0 <= t <= t1]
        return inside[-1] - inside[0] if len(inside) > 1 else 0.0


def steady(requests: Requests, seconds: float) -> list[float]:
    t0 = time.perf_counter()
    time.sleep(seconds)
    return requests.during(t0, time.perf_counter())


# --------------------------------------------------------------------------- runs


def run_loader(loader: Loader, path: Path, dest: Dest, sums: dict[str, tuple[int, int]], requests: Requests,
               repeats: int, device: str) -> dict[str, Any]:
    """``repeats`` loads by ``loader``, each checked; its row (without the steady p99, known at the end), or
    ``skipped`` (its library is missing) or ``error`` (it raised)."""
    row: dict[str, Any] = {"name": loader.name, "library": loader.library, "threads": None, "task_bytes": None,
                           **loader.settings}
    size = sum(t.numel() * t.element_size() for t in dest.values())
    runs, during = [], []
    try:
        why = loader.why_not()
        if why is not None:
            return {**row, "skipped": why}
        for _ in range(repeats):
            for t in dest.values():
                t.zero_()
            _sync(device)
            cpu0, t0 = time.process_time(), time.perf_counter()
            info = loader.load(path, dest)
            _sync(device)
            t1, cpu1 = time.perf_counter(), time.process_time()
            bad = mismatched(dest, sums)
            lat = requests.during(t0, t1)
            during += lat
            runs.append({"seconds": t1 - t0, "gbps": size / (t1 - t0) / GB,
                         "cpu_s_per_gb": (cpu1 - cpu0 - requests.cpu_between(t0, t1)) / (size / GB),
                         "requests": len(lat), "p50_ms": _ms(percentile(lat, 50)), "p99_ms": _ms(percentile(lat, 99)),
                         "verified": not bad, "mismatched": bad[:10], **info})
    except Exception as e:  # one loader failing is a result, not the end of the run
        return {**row, "error": f"{type(e).__name__}: {e}", "runs": runs}
    finally:
        loader.close()
    return {**row, "gbps": statistics.median(r["gbps"] for r in runs),
            "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in runs),
            "p50_during_ms": _ms(percentile(during, 50)), "p99_during_ms": _ms(percentile(during, 99)),
            "verified": all(r["verified"] for r in runs), "runs": runs}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


@contextlib.contextmanager
def checkpoint_file(directory: str | None, keep: bool) -> Iterator[Path]:
    """A path for the file, in a fresh folder deleted afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix="loaders-", dir=directory))
    path = folder / "model.safetensors"
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            path.unlink(missing_ok=True)
            folder.rmdir()


def libraries() -> dict[str, str]:
    """The versions of the libraries compared that are installed here."""
    out = {}
    for dist in ("kvikio-cu12", "kvikio-cu13", "fastsafetensors", "runai-model-streamer", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def main(argv: list[str] | None = None, extra: dict[str, Callable[[str], Loader]] | None = None) -> dict[str, Any]:
    """Run the comparison; ``extra`` adds loaders by name (tests). Returns the result written to ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--gb", type=float, default=16.0, help="size of the file (GB)")
    ap.add_argument("--tensor-mb", type=int, default=256, help="size of each tensor (MiB)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loaders", default=",".join(ALL), help="comma separated (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="loads per loader")
    ap.add_argument("--steady-s", type=float, default=3.0, help="seconds of requests without a load, before and after")
    ap.add_argument("--request-gap-ms", type=float, default=0.0, help="pause between two requests")
    ap.add_argument("--dir", default=None, help="where the file goes (default: the temporary folder)")
    ap.add_argument("--keep", action="store_true", help="do not delete the file")
    ap.add_argument("--dry-run", action="store_true", help="16 MB on the CPU in 1 MiB tensors, short steady windows")
    given = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(given)
    if args.dry_run:
        args.gb, args.tensor_mb, args.steady_s, args.repeats = 0.016, 1, 0.3, 1
        args.request_gap_ms = args.request_gap_ms or 1.0
        if "--device" not in given:
            args.device = "cpu"
    device = args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}"
    dtype = getattr(torch, args.dtype)
    numel = args.tensor_mb * MiB // dtype.itemsize
    count = max(1, round(args.gb * GB / (numel * dtype.itemsize)))
    names = [n for n in args.loaders.split(",") if n]
    makers = {**(extra or {})}
    result: dict[str, Any] = {"command": command("python3 -m bench.loaders", given), "environment": machine(device),
                              "libraries": libraries(),
                              "config": {"device": device, "dtype": args.dtype, "tensors": count,
                                         "tensor_bytes": numel * dtype.itemsize, "repeats": args.repeats,
                                         "steady_s": args.steady_s, "request_gap_ms": args.request_gap_ms},
                              "rows": [], "skipped": [], "errors": []}
    result["pinned_h2d_gbps"] = (1 << 30) / pinned_copy_seconds(1 << 30, device) / GB \
        if device.startswith("cuda") else None
    with checkpoint_file(args.dir, args.keep) as path:
        t = time.perf_counter()
        sums = write_checkpoint(path, count, numel, dtype, device)
        result["file"] = {"bytes": path.stat().st_size, "write_s": time.perf_counter() - t}
        dest = {n: torch.empty(numel, dtype=dtype, device=device) for n in sums}
        with Requests(device, args.request_gap_ms / 1e3) as requests:
            for _ in range(20):  # warm up the request path
                time.sleep(0.01)
            before = steady(requests, args.steady_s)
            for name in names:
                loader = makers[name](device) if name in makers else make_loader(name, device)
                row = run_loader(loader, path, dest, sums, requests, args.repeats, device)
                if "skipped" in row:
                    result["skipped"].append({"name": name, "library": row["library"], "reason": row["skipped"]})
                elif "error" in row:
                    result["errors"].append({"what": name, "error": row["error"], "runs": row["runs"]})
                else:
                    result["rows"].append(row)
                print(_line(row), file=sys.stderr, flush=True)
            after = steady(requests, args.steady_s)
    quiet = before + after
    result["steady"] = {"requests": len(quiet), "p50_ms": _ms(percentile(quiet, 50)),
                        "p99_ms": _ms(percentile(quiet, 99)), "before_p99_ms": _ms(percentile(before, 99)),
                        "after_p99_ms": _ms(percentile(after, 99))}
    for row in result["rows"]:
        row["p99_steady_ms"] = result["steady"]["p99_ms"]
        ratio = row["p99_during_ms"] / row["p99_steady_ms"] if row["p99_during_ms"] and row["p99_steady_ms"] else None
        row["p99_over_steady"] = ratio
    if args.json:
        write_json(result, args.json)
    return result


def _line(row: dict[str, Any]) -> str:
    if "skipped" in row or "error" in row:
        return f"{row['name']:18} {row.get('skipped') or row.get('error')}"
    return (f"{row['name']:18} {row['gbps']:7.2f} GB/s  {row['cpu_s_per_gb']:6.3f} CPU s/GB  "
            f"p99 during {row['p99_during_ms'] or float('nan'):7.2f} ms  "
            f"{'verified' if row['verified'] else 'WRONG BYTES'}")


if __name__ == "__main__":
    doc = main()
    sys.exit(0 if all(r["verified"] for r in doc["rows"]) and not doc["errors"] else 1)
