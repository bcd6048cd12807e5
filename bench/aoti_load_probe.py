"""Which AOTInductor loaders work on this machine? Each variant loads a tiny package in its own child process.

    python bench/aoti_load_probe.py [--device cpu|cuda] [--out bench/results/aoti-load-probe-<machine>.json]

Background: on one GPU machine every loader of its torch crashed, even for a CPU-only package
(docs/aoti-cuda.md, docs/benchmarks.md). This builds a 2-layer MLP package (weights inside, so it
can also run) and, for every loader variant this torch offers, runs a child Python that loads it
(and, for the ``+run`` variants, runs it once). A crash kills only the child; the JSON lists exit
code / signal per variant. The engine's own guard is :mod:`serving.engines.aoti.probe` (same child-process idea).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from bench.lib.host import machine  # noqa: E402
from bench.record import command, write_json  # noqa: E402
from serving.engines.aoti.probe import LOADERS, run_loader  # noqa: E402

RUN = "; out = m(torch.randn(2, 8, device='cuda' if int(sys.argv[2]) >= 0 else 'cpu')); print(out.shape)"

#: variant -> child code (argv: package path, device index); the engine's loaders plus run / .so variants
VARIANTS: dict[str, str] = {
    **LOADERS,
    "aoti_load_package+run": ("import sys, torch, torch._inductor; m = torch._inductor.aoti_load_package(sys.argv[1])"
                              + RUN),
    "run_single_threaded+run": ("import sys, torch, torch._inductor; "
                                "m = torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True)" + RUN),
    "import_only": "import sys, torch, torch._inductor",  # the baseline: does a plain child even start?
}
SO_VARIANT = ("import sys, torch, torch._export; m = torch._export.aot_load(sys.argv[1], "
              "'cuda' if int(sys.argv[2]) >= 0 else 'cpu')" + RUN)


def build_package(folder: Path, device: str) -> tuple[Path, Path | None, dict[str, str]]:
    """The tiny package (and a bare .so when this torch still has ``torch._export.aot_compile``)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval().to(device)
    x = (torch.randn(2, 8, device=device),)
    notes: dict[str, str] = {}
    ep = torch.export.export(model, x, strict=False)
    package = Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(folder / "mlp.pt2")))
    so: Path | None = None
    aot_compile = getattr(torch._export, "aot_compile", None)
    if aot_compile is None:
        notes["aot_load"] = "torch._export.aot_compile is not in this torch"
    else:
        try:
            so = Path(aot_compile(model, x, options={"aot_inductor.output_path": str(folder / "mlp.so")}))
        except Exception as e:  # deprecated and removed in some versions
            notes["aot_load"] = f"aot_compile failed: {type(e).__name__}: {e}"
    return package, so, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the package's code runs (cpu or cuda)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    a = parser.parse_args()
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="aoti-probe-") as tmp:
        t0 = time.perf_counter()
        package, so, notes = build_package(Path(tmp), a.device)
        build_s = time.perf_counter() - t0
        results = [run_loader(package, device, name, code=code, timeout=a.timeout) for name, code in VARIANTS.items()]
        if so is not None:
            results.append(run_loader(so, device, "torch._export.aot_load(.so)+run", code=SO_VARIANT,
                                      timeout=a.timeout))
    out = {
        "command": command("python bench/aoti_load_probe.py", sys.argv[1:]),
        "what": "AOTInductor loader variants, each loading a 2-layer MLP package in its own child process",
        # the host's GPU whatever the package's device: a crash is about this torch and CUDA on this host
        "machine": machine("cuda" if torch.cuda.is_available() else "cpu"),
        "package_device": a.device, "package_build_s": round(build_s, 2), "notes": notes,
        "variants": [{"variant": r.variant, "ok": r.ok, "returncode": r.returncode, "signal": r.signal,
                      "seconds": round(r.seconds, 2), "verdict": r.describe(), "output_tail": r.output[-600:]}
                     for r in results],
    }
    write_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
