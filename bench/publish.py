"""Publish benchmark: from the rename of a ~100 MB checkpoint into the weights folder to the first response
served with it, through the real watcher (watchdog events, debounce, completeness check, hash, read, refit).

    python bench/publish.py --json [--repeats 5] [--mode inotify|polling] [--debounce 0.2] [--device cpu]

Per trial, a new version is written under a hidden temp name (not timed, flushed to the page cache) and
renamed into the folder while a client thread sends requests back to back. Reported per trial and as
medians, all in seconds from the rename:

* ``detect``: until the worker starts on the entry (event delivery + debounce + completeness check);
* ``hash``: sha256 of the file (the version's identity, for no-op and rejection bookkeeping);
* ``read``: reading, checking and validating the tensors (the coordinator's read + validate stages);
* ``refit``: transfer, refit, canary, swap (the coordinator's other stages);
* ``first_response``: the rename until a client response computed with the new weights returns
  (``after_swap``: the part of it after the refit finished: the response in flight when the swap came).

The checkpoint is page-cached (just written), as a renamed-in file usually is. Timings on a shared
machine vary; the medians are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lib.clients import BackToBackClient  # noqa: E402
from bench.lib.host import machine  # noqa: E402
from serving.engines import build_engine  # noqa: E402
from serving.examples import TRANSFORMER  # noqa: E402
from serving.factory import build_module  # noqa: E402
from serving.publish import staging  # noqa: E402
from serving.refit import CanaryConfig, RefitCoordinator  # noqa: E402
from serving.specs import BuildSpec, TensorSpec  # noqa: E402
from serving.watch import WatchRecord, WeightsWatcher  # noqa: E402
from serving.weights.random_state import random_state_dict  # noqa: E402

#: ~103 MB of float32 weights: 25.7 M parameters
KWARGS = {"vocab": 1000, "seq_len": 16, "d_model": 512, "n_heads": 8, "d_ff": 2048, "n_layers": 8, "n_classes": 5}


def reference(module: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = torch.func.functional_call(module, {k: v.to(x.device) for k, v in state.items()}, (x,))
    return out.detach().cpu()


def trial(watcher: WeightsWatcher, client: BackToBackClient, module: torch.nn.Module, folder: Path, seed: int,
          x: torch.Tensor, timeout: float) -> dict[str, float]:
    state = random_state_dict(module, seed)
    ref = reference(module, state, x)
    name = f"v{seed:03d}.safetensors"
    with staging(folder, name) as staged:
        save_file(state, str(staged.temp))
        staged.seal()
        nbytes = staged.temp.stat().st_size
        del state
        t0 = time.monotonic()
        staged.commit()
    deadline = t0 + timeout
    record: WatchRecord | None = None
    first: float | None = None
    while time.monotonic() < deadline:
        if record is None:
            record = next((r for r in reversed(watcher.history) if r.path.endswith(name)), None)
        if record is not None:
            if record.report.outcome != "success":
                raise RuntimeError(f"{name}: {record.report.outcome} ({record.report.reason}) {record.report.message}")
            first = client.first_matching(t0, ref, atol=1e-4)
            if first is not None:
                break
        time.sleep(0.0005)
    if record is None or first is None:
        raise RuntimeError(f"{name}: not served within {timeout}s (client errors: {client.errors})")
    stages = record.report.stages
    read = stages.get("read", 0.0) + stages.get("validate", 0.0)
    refit = max(0.0, stages.get("total", 0.0) - read)
    return {
        "mb": nbytes / 1e6,
        "event": (record.first_event or record.started) - t0,
        "detect": record.started - t0,
        "hash": record.hash_s,
        "read": read,
        "refit": refit,
        "worker_done": record.finished - t0,
        "first_response": first - t0,
        "after_swap": first - record.finished,
        "tensors_refitted": float(record.report.tensors_refitted),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="inotify", choices=["inotify", "polling"])
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--debounce", type=float, default=0.2, help="the watcher's debounce (the setting's default)")
    p.add_argument("--strategy", default="double_buffer", choices=["double_buffer", "in_place"])
    p.add_argument("--canary", default="finite", choices=["off", "finite"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-model", type=int, default=KWARGS["d_model"])
    p.add_argument("--n-layers", type=int, default=KWARGS["n_layers"])
    p.add_argument("--dir", help="where the weights folder goes (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=120.0)
    return p.parse_args(argv)


def run_trials(args: argparse.Namespace, kwargs: dict[str, int], folder: Path) -> tuple[list[dict[str, float]],
                                                                                        BackToBackClient, bool]:
    """Serve the transformer from ``folder`` through the real watcher; publish and time ``--repeats`` versions.
    Returns the trials, the client (its errors) and whether the coordinator took the fast path."""
    inputs = (TensorSpec("TOKENS", torch.int64, (kwargs["seq_len"],)),)
    spec = BuildSpec(factory=TRANSFORMER, inputs=inputs, device=args.device,
                     factory_kwargs=tuple(sorted(kwargs.items())))
    module = build_module(TRANSFORMER, kwargs).to(args.device)
    x = torch.randint(0, kwargs["vocab"], (1, kwargs["seq_len"]), generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    coord = RefitCoordinator(build_engine("eager", spec), strategy=args.strategy,
                             canary=CanaryConfig(mode=args.canary), canary_input_specs=inputs)
    watcher = WeightsWatcher(folder, coord, mode=args.mode, poll_interval_s=args.poll_interval,
                             debounce_s=args.debounce)
    save_file(random_state_dict(module, 0), str(folder / "v000.safetensors"))
    initial = watcher.install_initial()
    if initial.report is None or not initial.report.ok:
        raise RuntimeError(f"the first version did not install: {initial.explain()}")
    client = BackToBackClient(coord, x)
    client.thread.start()
    watcher.start()
    trials = []
    try:
        for i in range(1, args.repeats + 1):
            trials.append(trial(watcher, client, module, folder, i, x, args.timeout))
            if not args.json:
                print(f"trial {i}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in trials[-1].items()
                                                   if k not in ("mb", "tensors_refitted")), flush=True)
    finally:
        client.stop.set()
        client.thread.join(10)
        watcher.stop()
        coord.close()
    return trials, client, coord.fast_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = {**KWARGS, "d_model": args.d_model, "n_layers": args.n_layers}
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hotswap-bench-"))
    folder = base / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        trials, client, fast_path = run_trials(args, kwargs, folder)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    keys = [k for k in trials[0] if k not in ("mb", "tensors_refitted")]
    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/publish.py", *(sys.argv[1:] if argv is None else argv)]),
        "benchmark": "publish: rename of a checkpoint into the weights folder -> first response with it",
        "machine": machine(args.device),
        "config": {"mode": args.mode, "debounce_s": args.debounce, "strategy": args.strategy,
                   "canary": args.canary, "engine": "eager", "factory_kwargs": kwargs, "fast_path": fast_path},
        "checkpoint_mb": round(trials[0]["mb"], 1),
        "median_s": {k: round(statistics.median(t[k] for t in trials), 4) for k in keys},
        "trials_s": [{k: round(v, 4) for k, v in t.items()} for t in trials],
        "client_errors": client.errors,
    }
    print(json.dumps(result, indent=2) if args.json else json.dumps(result["median_s"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
