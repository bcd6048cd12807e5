"""Real architectures: refit and publish -> live per engine, beside Torch-TensorRT's published refit times.

    python bench/real_refit.py --json out.json [--models resnet18,resnet50,bert-base] [--engines eager,aoti]
                                               [--device cpu|cuda] [--repeats 5]

Each model is the library's own class at its full size, random weights (nothing is downloaded):
ResNet-18/50 (transformers' ``ResNetForImageClassification``, the torchvision layout; ``tv-resnet50`` is
torchvision's own, ``tv-resnet18/50``, where torchvision imports) and BERT-base (``BertForSequenceClassification``). Per
model and engine, from one process:

* ``build_s``: the engine build without a cache (compile, warm up, checks);
* ``refit_s``: ``RefitCoordinator.refit_from_path`` of a page-cached ``model.safetensors`` to the
  live engine (read, validate, transfer, refit, canary, swap), median of ``--repeats``, with stages;
* ``publish_to_live_s``: ``serving.publish.publish(..., link=True)`` of a ``save_pretrained``-like directory
  into a watched folder (hard links, so no copy is timed: from the rename) until the coordinator serves it
  (watcher events, settle, identity, then as above).

``torch_tensorrt_refit_s`` is the time Torch-TensorRT's ``refit_module_weights`` is documented to take
for the same architecture (its own measurement, other hardware): context, not a measurement here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lib.host import machine  # noqa: E402
from bench.record import command  # noqa: E402
from serving.engines import build_engine  # noqa: E402
from serving.factory import build_module  # noqa: E402
from serving.publish import publish  # noqa: E402
from serving.refit import RefitCoordinator  # noqa: E402
from serving.specs import BuildSpec, TensorSpec  # noqa: E402
from serving.watch import WeightsWatcher  # noqa: E402
from serving.weights.random_state import random_state_dict  # noqa: E402

_IMAGE = (TensorSpec("IMAGE", torch.float32, (3, 224, 224)),)


@dataclass(frozen=True)
class RealModel:
    factory: str
    kwargs: tuple[tuple[str, Any], ...]
    inputs: tuple[TensorSpec, ...]
    #: Torch-TensorRT's documented refit_module_weights time for this architecture, seconds
    torch_tensorrt_refit_s: float | None

    def spec(self, device: str, max_batch: int) -> BuildSpec:
        return BuildSpec(factory=self.factory, inputs=self.inputs, max_batch=max_batch, device=device,
                         factory_kwargs=self.kwargs)


MODELS: dict[str, RealModel] = {
    "resnet18": RealModel("serving.examples.hf:resnet_classifier",
                          (("depths", [2, 2, 2, 2]), ("hidden_sizes", [64, 128, 256, 512]), ("layer_type", "basic"),
                           ("num_labels", 1000)), _IMAGE, 0.98),
    # ResNetConfig's defaults are ResNet-50's (bottleneck blocks, depths 3-4-6-3)
    "resnet50": RealModel("serving.examples.hf:resnet_classifier", (("num_labels", 1000),), _IMAGE, 2.03),
    "tv-resnet18": RealModel("serving.examples.vision:torchvision_model", (("name", "resnet18"),), _IMAGE, 0.98),
    "tv-resnet50": RealModel("serving.examples.vision:torchvision_model", (("name", "resnet50"),), _IMAGE, 2.03),
    # BertConfig's defaults are BERT-base's (12 layers, hidden 768, vocabulary 30522)
    "bert-base": RealModel("serving.examples.hf:bert_classifier", (("num_labels", 2),),
                           (TensorSpec("INPUT_IDS", torch.int64, (128,)),), 2.86),
}
TORCH_TENSORRT_SOURCE = ("Torch-TensorRT refit_module_weights (torch_tensorrt.dynamo), documented refit times: "
                         "ResNet-18 0.98 s, ResNet-50 2.03 s, BERT 2.86 s")


def _median_stages(reports: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in reports if k in r), 5) for k in reports[0]}


def _wait_live(coord: RefitCoordinator, watcher: WeightsWatcher, version: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while coord.live_version != version:
        if time.monotonic() > deadline or version in watcher.rejected:
            raise RuntimeError(f"{version} not live: rejected {dict(watcher.rejected)}")
        time.sleep(0.002)


def bench_model(key: str, engine_kind: str, device: str, repeats: int, work: Path) -> dict[str, Any]:
    model = MODELS[key]
    spec = model.spec(device, max_batch=4)
    module = build_module(model.factory, dict(model.kwargs))
    t0 = time.perf_counter()
    engine = build_engine(engine_kind, spec, cache=None)
    build_s = time.perf_counter() - t0
    coord = RefitCoordinator(engine)
    out: dict[str, Any] = {"model": key, "engine": engine_kind, "device": device, "factory": model.factory,
                           "kwargs": dict(model.kwargs), "build_s": round(build_s, 2),
                           "torch_tensorrt_refit_s": model.torch_tensorrt_refit_s}
    try:
        folder = work / f"{key}-{engine_kind}"
        versions = []
        for seed in range(repeats * 2 + 2):  # a save_pretrained-like directory per version
            d = folder / "versions" / f"v{seed}"
            d.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in random_state_dict(module, seed).items()},
                      str(d / "model.safetensors"))
            (d / "config.json").write_text(json.dumps({"model": key}))
            (d / "model.safetensors").read_bytes()  # page-cached, as a just-copied file is
            versions.append(d)
        out["checkpoint_bytes"] = (versions[0] / "model.safetensors").stat().st_size
        coord.refit_from_path(versions[0] / "model.safetensors")
        coord.refit_from_path(versions[1] / "model.safetensors")  # both slots hold weights
        reports = []
        for d in versions[2:repeats + 2]:
            report = coord.refit_from_path(d / "model.safetensors")
            assert report.outcome == "success", report
            reports.append(dict(report.stages))
        out["refit_s"] = round(statistics.median(r["total"] for r in reports), 4)
        out["refit_stages_s"] = _median_stages(reports)
        watched = folder / "watched"
        watched.mkdir()
        watcher = WeightsWatcher(watched, coord, debounce_s=0.05)
        watcher.start()
        try:
            times = []
            for i, d in enumerate(versions[repeats + 2:]):
                t = time.perf_counter()
                publish(d, watched, version=f"p{i}", link=True)  # from the rename: no copy to wait for
                _wait_live(coord, watcher, f"p{i}")
                times.append(time.perf_counter() - t)
        finally:
            watcher.stop(timeout=30)
        out["publish_to_live_s"] = round(statistics.median(times), 4)
        out["publish_to_live_all_s"] = [round(t, 4) for t in times]
        ref = model.torch_tensorrt_refit_s
        out["torch_tensorrt_over_refit"] = round(ref / out["refit_s"], 1) if ref else None
    finally:
        coord.close()
        engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--models", default="resnet18,resnet50,bert-base")
    ap.add_argument("--engines", default="eager,aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {
        "command": command("python bench/real_refit.py", given),
        "machine": machine(args.device),
        "torch_tensorrt_source": TORCH_TENSORRT_SOURCE, "runs": [], "errors": []}
    with tempfile.TemporaryDirectory(prefix="real-refit-") as tmp:
        for key in [m for m in args.models.split(",") if m]:
            for engine_kind in [e for e in args.engines.split(",") if e]:
                try:
                    r = bench_model(key, engine_kind, args.device, args.repeats, Path(tmp))
                except Exception as e:  # one model's failure is a result too; the others still run
                    result["errors"].append({"model": key, "engine": engine_kind, "error": f"{type(e).__name__}: {e}"})
                    print(f"!! {key} {engine_kind}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    continue
                result["runs"].append(r)
                print(f"{key:12} {engine_kind:9} {r['checkpoint_bytes'] / 1e6:7.1f} MB  build {r['build_s']:6.1f} s  "
                      f"refit {r['refit_s'] * 1e3:7.1f} ms  publish->live {r['publish_to_live_s'] * 1e3:7.1f} ms  "
                      f"(Torch-TensorRT refit {r['torch_tensorrt_refit_s']} s)", flush=True)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
