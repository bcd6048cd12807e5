"""What refittability costs: inference latency of weight-stripped engines vs the same engines with weights baked in.

    python bench/engine_latency.py [--device cpu|cuda] [--dtype float16] [--d-model 256] [--layers 2]
                                   [--engines eager,inductor,inductor_frozen,aoti,aoti_baked] [--cuda-graphs]
                                   [--out bench/results/engine-latency-<machine>.json]

All in one process, same model, same weights, same inputs:

* ``eager``: the module under ``torch.no_grad()``;
* ``inductor``: the serving engine (weights as graph inputs, refittable), timed through ``slot.run``;
* ``inductor_frozen``: ``torch.compile`` of the module with ``torch._inductor.config.freezing`` on (weights
  are constants of the code: folded, prepacked; not refittable);
* ``aoti``: the serving engine (package without weights, constants registered by refit);
* ``aoti_baked``: ``aoti_compile_and_package`` with the weights inside the ``.so`` (the default).

Each is checked against eager first (a wrong output fails the run), then timed: median of ``--iters``
runs after a warm-up, for every batch in ``--batches`` (CUDA: synchronized per run). The engines take turns
(``--rounds``), so a change in the machine's load during the run affects them all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from bench.lib.host import machine  # noqa: E402
from bench.record import command, write_json  # noqa: E402
from serving.engines import build_engine  # noqa: E402
from serving.engines.export import export, make_module  # noqa: E402
from serving.examples import TRANSFORMER  # noqa: E402
from serving.specs import BuildSpec, TensorSpec  # noqa: E402

Runner = Callable[[torch.Tensor], torch.Tensor]


def spec_for(a: argparse.Namespace) -> BuildSpec:
    kwargs = {"d_model": a.d_model, "n_heads": 4, "d_ff": 4 * a.d_model, "n_layers": a.layers, "vocab": 1000,
              "seq_len": 16}
    options = (("cuda_graphs", True),) if a.cuda_graphs else ()
    return BuildSpec(factory=TRANSFORMER, inputs=(TensorSpec("TOKENS", torch.int64, (16,)),),
                     max_batch=max(a.batches), device=a.device, dtype=getattr(torch, a.dtype),
                     factory_kwargs=tuple(sorted(kwargs.items())), options=options)


def engine_runner(kind: str, spec: BuildSpec, state: dict[str, torch.Tensor]) -> Runner:
    engine = build_engine(kind, spec)
    slot = engine.new_slot()
    slot.refit(slot.transfer({k: v for k, v in state.items() if k in engine.weight_specs()}))
    return lambda x: slot.run([x])[0]


def frozen_inductor(spec: BuildSpec, module: torch.nn.Module) -> Runner:
    compiled = torch.compile(module)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        for n in sorted({1, 2, spec.max_batch}):
            x = torch.zeros(n, 16, dtype=torch.int64, device=spec.device)
            if n > 1:
                torch._dynamo.mark_dynamic(x, 0, min=1, max=spec.max_batch)
            compiled(x)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = compiled(x)
        return out

    return run


def baked_aoti(spec: BuildSpec, module: torch.nn.Module, folder: Path) -> Runner:
    device = torch.device(spec.device)
    with torch.no_grad():
        ep = export(module, spec, device)
    path = torch._inductor.aoti_compile_and_package(
        ep, package_path=str(folder / "baked.pt2"), inductor_configs={"always_keep_tensor_constants": True})
    index = device.index if device.type == "cuda" and device.index is not None else (0 if device.type == "cuda"
                                                                                     else -1)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
    return lambda x: loader.boxed_run([x])[0]


def eager_runner(module: torch.nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = module(x)
        return out

    return run


def time_runners(runners: dict[str, Runner], x: torch.Tensor, iters: int, rounds: int) -> dict[str, float]:
    """Median latency of each runner; the runners take turns (``rounds`` times ``iters / rounds`` runs each), so
    a machine whose load changes during the run slows them all alike."""
    cuda = x.device.type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        for _ in range(5):
            run(x)
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(max(1, iters // rounds)):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(x)
                if cuda:
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--engines", default="eager,inductor,inductor_frozen,aoti,aoti_baked")
    parser.add_argument("--cuda-graphs", action="store_true", help="the inductor engine with cuda_graphs: true")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    return parser.parse_args()


def make_runner(name: str, spec: BuildSpec, module: torch.nn.Module, state: dict[str, torch.Tensor],
                folder: Path) -> Runner:
    if name == "eager":
        return eager_runner(module)
    if name in ("inductor", "aoti"):
        return engine_runner(name, spec, state)
    if name == "inductor_frozen":
        return frozen_inductor(spec, module)
    if name == "aoti_baked":
        return baked_aoti(spec, module, folder)
    raise SystemExit(f"unknown engine {name!r}")


def measure(a: argparse.Namespace, spec: BuildSpec) -> tuple[dict[str, dict[str, object]], dict[str, float]]:
    """Build every engine, check it against eager, then time them in turns: latencies (or the build's error)
    and build times by engine."""
    torch.manual_seed(0)
    module = make_module(spec, torch.device(spec.device)).requires_grad_(False)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    inputs = {n: torch.randint(0, 1000, (n, 16), device=spec.device) for n in a.batches}
    expected = {n: eager_runner(module)(x) for n, x in inputs.items()}
    tol = 1e-3 if spec.dtype == torch.float32 else 3e-2
    results: dict[str, dict[str, object]] = {}
    runners: dict[str, Runner] = {}
    build_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="engine-latency-") as tmp:
        for name in a.engines.split(","):
            t0 = time.perf_counter()
            try:
                run = make_runner(name, spec, module, state, Path(tmp))
            except Exception as e:  # e.g. aoti refused where its loader crashes: say so, go on
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                print(f"{name}: {results[name]}", file=sys.stderr)
                continue
            build_s[name] = round(time.perf_counter() - t0, 2)
            for n, x in inputs.items():
                torch.testing.assert_close(run(x).float(), expected[n].float(), atol=tol, rtol=tol)
            runners[name] = run
            print(f"{name}: built in {build_s[name]}s, outputs equal to eager", file=sys.stderr)
        for n, x in inputs.items():
            for name, median in time_runners(runners, x, a.iters, a.rounds).items():
                results.setdefault(name, {})[f"batch_{n}_ms"] = round(1e3 * median, 4)
    return results, build_s


def ratio(results: dict[str, dict[str, object]], num: str, den: str) -> dict[str, float] | None:
    """``num``'s latencies over ``den``'s, batch by batch (None if either did not build). Pure."""
    r_num, r_den = results.get(num), results.get(den)
    if not isinstance(r_num, dict) or not isinstance(r_den, dict) or "error" in r_num or "error" in r_den:
        return None
    return {k: round(float(r_num[k]) / float(r_den[k]), 3) for k in r_num}  # type: ignore[arg-type]


def main() -> int:
    a = parse_args()
    spec = spec_for(a)
    results, build_s = measure(a, spec)
    out = {
        "command": command("python bench/engine_latency.py", sys.argv[1:]),
        "what": "median inference latency (ms): refittable engines vs the same engines with weights baked in, vs eager",
        "machine": machine(spec.device),
        "model": {"factory": "tiny_transformer", **spec.kwargs(), "dtype": a.dtype, "device": a.device,
                  "cuda_graphs": a.cuda_graphs},
        "iters": a.iters, "latency": results, "build_s": build_s,
        "refittable_over_baked": {"inductor": ratio(results, "inductor", "inductor_frozen"),
                                  "aoti": ratio(results, "aoti", "aoti_baked")},
        "compiled_over_eager": {"inductor": ratio(results, "inductor", "eager"),
                                "aoti": ratio(results, "aoti", "eager")},
    }
    write_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
