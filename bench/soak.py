"""Soak: a real Triton under constant client load while new versions and LoRA adapters are published, for a
long run, watching for errors, torn responses and anything that grows.

    python3 -m bench.soak --swaps 1000 --json bench/results/soak-cpu2.json               # the example models
    python3 -m bench.soak --kind KIND_GPU --size-gb 1 --swaps 300 --sample-every 25 \\
        --warmup-swaps 100 --json $OUT/soak-h200.json                                     # a 1 GB model, GPU

``KIND_CPU`` serves the example repository (``model_repository/``: ``tiny_transformer`` on AOTInductor,
``tiny_cnn`` on eager with two instances); ``KIND_GPU`` serves the benchmark MLP (``--size-gb``, float32) on
one GPU instance (``--models mlp --kind KIND_CPU`` runs that path on the CPU, figures meaningless). gRPC
clients send requests to every model throughout. The models take turns; each swap publishes a new random
version with the tools a user has, in turn (``hotswap publish``'s function, ``publish_tensors``, a write
under a hidden name then a rename, a plain copy; for directories ``hotswap publish`` with hard links, or a
directory renamed in), or every ``--adapter-every``-th swap of a model a PEFT LoRA adapter on its live base
(what ``hotswap lora random`` writes), taken off by the next swap (the base touched, or published again).
After each swap is live on every instance, older versions are deleted from the folder, as a user would.

Every response must match the reference output of the version its ``HOTSWAP_WEIGHTS_VERSION_UTF8`` names
(and ``HOTSWAP_WEIGHTS_VERSION`` where the model sends it): otherwise it is torn. Every failed request is an
error. Every ``--sample-every`` swaps the run records, per Triton stub process (each model instance) and for
the server, resident memory, open file descriptors, threads, locked, pinned and NVIDIA-mapped memory; GPU
memory (device and per process, ``nvidia-smi``); Triton's pinned pool; hotswap's series on /metrics; files
in the server's private TMPDIR, in hotswap's work folders there, in the engine cache and in the weights
folders (:mod:`bench.lib.soak_samples`). Target: 0 errors, 0 torn, every series flat after
``--warmup-swaps`` (least-squares growth under 1% of its level per 100 swaps). The JSON (rewritten at every
sample, so a run cut short keeps what it measured) has every series against swaps; the server is stopped at
the end, on Ctrl-C and on SIGTERM. Exit status 0 only when the target is met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from bench.lib.host import machine, pick_dir  # noqa: E402
from bench.lib.soak_models import ExampleModels, MlpModels, describe  # noqa: E402
from bench.lib.soak_plan import (  # noqa: E402
    DIRECTORY_TOOLS,
    EXAMPLE_TOOLS,
    FIRST,
    SETTLED,
    Step,
    plan,
    settled,
    to_prune,
    tool_counts,
)
from bench.lib.soak_samples import TARGET_PCT_PER_100, Watched, gpu_reason, sample, series_table  # noqa: E402
from bench.lib.stats import median, percentile  # noqa: E402
from bench.lib.swapload import ClientPool, SwapLoadResult, classify, run_swap_load, utf8_response_version  # noqa: E402
from bench.lib.triton_repo import ensure_pytriton_findable  # noqa: E402
from bench.record import command, command_args, dumps  # noqa: E402
from serving.triton.scrape import scrape, weights_versions  # noqa: E402
from serving.triton.server import TritonProcess  # noqa: E402


class References:
    """Each version's expected output, by ``model:version``; read by every client thread."""

    def __init__(self) -> None:
        self._refs: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def add(self, key: str, ref: np.ndarray) -> None:
        with self._lock:
            self._refs[key] = ref

    def get(self, key: str | None) -> np.ndarray | None:
        with self._lock:
            return self._refs.get(key) if key is not None else None

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            return dict(self._refs)

    def match(self, out: np.ndarray, said: str | None, atol: float) -> list[str]:
        """The versions ``out`` matches: the one the response names when it does (one comparison), else every
        version's (what a torn response is reported with)."""
        ref = self.get(said)
        if ref is not None and ref.shape == out.shape and np.allclose(out, ref, atol=atol, rtol=0):
            return [said] if said is not None else []
        return classify(out, self.snapshot(), atol)


class Counts:
    """Requests answered, errors and torn responses so far (sampled with the resources)."""

    def __init__(self) -> None:
        self.answered = self.errors = self.torn = 0
        self._lock = threading.Lock()

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def __call__(self, start: float, latency: float, version: str | None) -> None:
        with self._lock:
            self.answered += 1
            self.torn += version is None


def wait_live(server: TritonProcess, model: str, version: str, timeout: float) -> None:
    """Until every instance of ``model`` reports ``version`` live (``hotswap_weights_info``)."""
    deadline = time.monotonic() + timeout
    live: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            live = weights_versions(scrape(server.metrics_url), model)
        except OSError:
            live = {}
        if live and set(live.values()) == {version}:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model}: {version} not live after {timeout:.0f} s (live: {live})")


def prune(folder: Path, step: Step) -> None:
    """Delete what a user deletes once ``step`` is live (:func:`bench.lib.soak_plan.to_prune`)."""
    for name in to_prune(os.listdir(folder), step):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class Soak:
    """One run: the server, the models, the clients, the swaps and the samples."""

    def __init__(self, args: argparse.Namespace, work: Path, given: list[str]) -> None:
        self.args, self.work, self.given = args, work, given
        self.gpu = args.kind == "KIND_GPU"
        self.models: ExampleModels | MlpModels = (MlpModels(work, args.size_gb, args.kind) if args.models == "mlp"
                                                  else ExampleModels(work))
        self.steps = plan(args.swaps, self.models.names, DIRECTORY_TOOLS if args.models == "mlp" else EXAMPLE_TOOLS,
                          args.adapter_every)
        self.weights_root = work / "weights"
        self.cache_dir = Path(os.environ.get("HOTSWAP_CACHE_DIR") or work / "cache")
        self.refs = References()
        self.counts = Counts()
        self.samples: list[dict[str, Any]] = []
        self.publish_to_live: list[float] = []
        self.done = 0
        self.last_swap_end: float | None = None
        self.history: dict[str, list[str]] = {m: ["base"] * SETTLED for m in self.models.names}
        self.next_sample = args.sample_every
        self.gpu_why = gpu_reason(self.gpu)
        self.started = self.wall_started = time.monotonic()
        self.log_tail = ""
        self.failure: str | None = None
        self.server = TritonProcess(self.models.repository, work_dir=work / "triton",
                                    env=dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(self.weights_root),
                                             HOTSWAP_CACHE_DIR=str(self.cache_dir)))
        self.watched: Watched | None = None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        for m in self.models.names:
            self.refs.add(f"{m}:{FIRST}", self.models.first(self.weights_root / m, m))
        self.server.start()
        try:
            self.server.wait_ready(self.models.names, self.args.ready_timeout)
            for m in self.models.names:
                wait_live(self.server, m, FIRST, self.args.live_timeout)
            assert self.server.proc is not None
            self.watched = Watched(self.server.proc.pid, self.server.metrics_url, self.server.tmp_dir,
                                   self.cache_dir, self.weights_root, self.gpu)
            self.started = time.monotonic()
            try:
                result: SwapLoadResult | None = self._load()
            except Exception as e:  # the JSON keeps what was measured and why it stopped; Ctrl-C is not caught
                self.failure = f"{type(e).__name__}: {e}"
                result = None
            if result is not None and self.samples[-1]["swap"] != self.done and settled(self.history):
                self._sample()
            try:
                metrics: list[Any] | None = scrape(self.server.metrics_url)
            except OSError:
                metrics = None
        finally:
            self.log_tail = self.server.log_tail(4000)
            self.server.stop()
        return self.document(result, metrics, complete=result is not None)

    def _load(self) -> SwapLoadResult:
        import tritonclient.grpc as grpcclient

        pool = ClientPool(lambda: grpcclient.InferenceServerClient(self.server.grpc_url))
        local = threading.local()
        names = self.models.names

        def infer() -> tuple[np.ndarray, str]:
            try:
                local.i = getattr(local, "i", -1) + 1
                model = names[local.i % len(names)]
                input_name, x, dtype = self.models.request(model)
                inp = grpcclient.InferInput(input_name, list(x.shape), dtype)
                inp.set_data_from_numpy(x)
                result = pool.get().infer(model, [inp], client_timeout=60)
                return np.asarray(result.as_numpy(self.models.output)), f"{model}:{utf8_response_version(result)}"
            except Exception:
                self.counts.error()
                raise

        deadline = self.started + self.args.time_limit_s if self.args.time_limit_s else None
        with pool:
            return run_swap_load(infer, {}, self._swap, [str(s.swap) for s in self.steps], clients=self.args.clients,
                                 warmup_s=2.0, settle_s=self.args.settle, cooldown_s=1.0, atol=self.args.atol,
                                 max_requests=50_000_000, observe=self.counts,
                                 match=lambda out, said: self.refs.match(out, said, self.args.atol), deadline=deadline)

    def _swap(self, which: str) -> None:
        step = self.steps[int(which) - 1]
        if step.swap == 1:
            self._sample()
        folder = self.weights_root / step.model
        self.refs.add(step.key, self.models.reference(step))
        t0 = time.monotonic()
        self.models.publish(step, folder)
        wait_live(self.server, step.model, step.live, self.args.live_timeout)
        self.publish_to_live.append(time.monotonic() - t0)
        prune(folder, step)
        self.done = step.swap
        self.last_swap_end = time.monotonic()
        self.history[step.model].append(step.action)
        # due every --sample-every swaps, taken at the first swap after that in the settled state
        if step.swap >= self.next_sample and settled(self.history):
            self._sample()

    def _sample(self) -> None:
        assert self.watched is not None
        series = sample(self.watched, self.gpu_why)
        self.next_sample = (self.done // self.args.sample_every + 1) * self.args.sample_every
        self.samples.append({"swap": self.done, "elapsed_s": round(time.monotonic() - self.started, 2),
                             "answered": self.counts.answered, "errors": self.counts.errors,
                             "torn": self.counts.torn, "series": series})
        print(f"swap {self.done}: {self.counts.answered} answered, {self.counts.errors} errors, "
              f"{self.counts.torn} torn, {time.monotonic() - self.started:.0f} s", file=sys.stderr, flush=True)
        if self.args.json:
            write_atomic(Path(self.args.json), dumps(self.document(None, None, complete=False)) + "\n")

    # ------------------------------------------------------------------ the result
    def document(self, result: SwapLoadResult | None, metrics: list[Any] | None, *, complete: bool) -> dict[str, Any]:
        args = self.args
        swaps_at = [s["swap"] for s in self.samples]
        series = series_table(swaps_at, [s["series"] for s in self.samples], args.warmup_swaps)
        duration = round(self.last_swap_end - self.started, 1) if self.last_swap_end else None
        errors = result.errors if result else self.counts.errors
        torn = result.torn if result else self.counts.torn
        flat = [v["flat"] for v in series.values() if v["flat"] is not None]
        doc: dict[str, Any] = {
            "command": command("python3 -m bench.soak", self.given), "argv": command_args(self.given),
            "machine": machine("cuda" if self.gpu else "cpu"), "complete": complete,
            "kind": args.kind, "models": describe(self.models), "clients": args.clients,
            "swaps": self.done, "swaps_requested": args.swaps, "sample_every": args.sample_every,
            "warmup_swaps": args.warmup_swaps, "adapter_every": args.adapter_every, "duration_s": duration,
            "wall_s": round(time.monotonic() - self.wall_started, 1),
            "publishes": tool_counts(self.steps[:self.done]),
            "requests": result.requests if result else self.counts.answered + errors, "errors": errors, "torn": torn,
            "error_samples": list(result.error_samples) if result else [],
            "stub_restarts": list(self.watched.restarts) if self.watched else [],
            "publish_to_live_s": {"median": median(self.publish_to_live),
                                  "p99": percentile(self.publish_to_live, 99),
                                  "max": max(self.publish_to_live, default=None)},
            "gpu_memory": None if self.gpu_why is None else self.gpu_why,
            "target": {"errors": 0, "torn": 0, "growth_pct_per_100_swaps": TARGET_PCT_PER_100},
            "met": complete and errors == 0 and torn == 0 and bool(flat) and all(flat)
            and not (self.watched and self.watched.restarts),
            "samples": [{k: v for k, v in s.items() if k != "series"} for s in self.samples],
            "series": series,
        }
        if result is not None:
            doc["latency_ms"] = {"steady_p50": result.steady_p50_ms, "steady_p99": result.steady_p99_ms,
                                 "swap_p50": result.swap_p50_ms, "swap_p99": result.swap_p99_ms}
            doc["versions_answered"] = len(result.versions_seen)
        if metrics is not None:
            doc["refits"] = refit_outcomes(metrics)
        if self.failure:
            doc["failure"] = self.failure
        if (complete or self.failure) and not doc["met"]:
            doc["triton_log_tail"] = self.log_tail
        return doc


def write_atomic(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` in one rename (a reader never sees half a JSON)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def refit_outcomes(samples: list[Any]) -> dict[str, float]:
    """``outcome[/reason]`` -> total over every instance of ``hotswap_refits_total``, and the watcher's errors."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == "hotswap_refits_total" and s.value:
            key = s.labels.get("outcome", "") + (f"/{s.labels['reason']}" if s.labels.get("reason") else "")
            out[key] = out.get(key, 0) + s.value
        elif s.name == "hotswap_watcher_errors_total":
            out["watcher_errors"] = out.get("watcher_errors", 0) + s.value
    return dict(sorted(out.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="KIND_CPU", choices=["KIND_CPU", "KIND_GPU"])
    ap.add_argument("--models", choices=["examples", "mlp"],
                    help="examples: model_repository/ (CPU only); mlp: the benchmark MLP at --size-gb "
                         "(default: examples on KIND_CPU, mlp on KIND_GPU)")
    ap.add_argument("--size-gb", type=float, default=1.0, help="the MLP's size (float32 weights)")
    ap.add_argument("--swaps", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-every", type=int, default=100, help="record the resources every N swaps")
    ap.add_argument("--warmup-swaps", type=int, default=200, help="growth is measured over the samples after this")
    ap.add_argument("--adapter-every", type=int, default=10,
                    help="every N-th swap of a model publishes a LoRA adapter (0: none); the next takes it off")
    ap.add_argument("--settle", type=float, default=0.2, help="seconds between a swap going live and the next")
    ap.add_argument("--atol", type=float, help="output tolerance (default 1e-4 examples, 1e-3 mlp)")
    ap.add_argument("--live-timeout", type=float, default=120.0, help="seconds a publish may take to go live")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--time-limit-s", type=float, help="publish nothing more after this many seconds")
    ap.add_argument("--dir", help="where the run's files go (default: /dev/shm for the MLP if it has room, else "
                                  "the temp folder)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    args.models = args.models or ("mlp" if args.kind == "KIND_GPU" else "examples")
    if args.models == "examples" and args.kind == "KIND_GPU":
        ap.error("--models examples runs on KIND_CPU (model_repository/ declares CPU instances)")
    args.atol = args.atol if args.atol is not None else 1e-3 if args.models == "mlp" else 1e-4
    if args.adapter_every and args.adapter_every < SETTLED + 2:
        ap.error(f"--adapter-every {args.adapter_every}: 0, or at least {SETTLED + 2} (samples are taken after "
                 f"{SETTLED} new versions in a row of every model)")
    after = [s for s in range(0, args.swaps + 1, max(1, args.sample_every)) if s >= args.warmup_swaps]
    if args.sample_every < 1 or len(after) < 2:
        ap.error(f"--swaps {args.swaps}, --sample-every {args.sample_every}, --warmup-swaps {args.warmup_swaps}: "
                 "growth needs at least two samples at or after the warm-up")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the server like Ctrl-C does
    ensure_pytriton_findable()
    need = 3 * args.size_gb * 1e9 if args.models == "mlp" else 0
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=pick_dir(args.dir, need) if need else args.dir))
    try:
        soak = Soak(args, work, given)
        doc = soak.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = dumps(doc)
    if args.json:
        write_atomic(Path(args.json), text + "\n")
    brief = {k: doc[k] for k in ("swaps", "duration_s", "requests", "errors", "torn", "met")}
    brief["not_flat"] = [k for k, v in doc["series"].items() if v["flat"] is False]
    if doc.get("failure"):
        brief["failure"] = doc["failure"]
    print(dumps(brief))
    return 0 if doc["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
