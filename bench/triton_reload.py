"""Baseline: a new model version the way a Triton user publishes it without hotswap.

    python -m bench.triton_reload --json out.json --width 4096 --layers 8 --swaps 5 [--kind KIND_CPU]

The same benchmark MLP as ``bench.gpu_serve_swap`` (``bench.lib.models``: ``layers`` square Linear
layers with tanh plus a marker bias), served by a plain Python-backend ``model.py`` that loads its
weights in ``initialize`` (``safetensors.torch.load_file`` then ``load_state_dict``; no hotswap code
in the server; ``bench.lib.reload``). Triton runs
with ``--model-control-mode=explicit``; each new version is published as a new version directory (files
copied under a hidden name, then renamed to ``<n>/``) and loaded through the repository API
(``POST /v2/repository/models/<name>/load``), with ``version_policy: latest 1``. Clients send requests
throughout. Reported per version: publish (rename) → first response computed with the new weights,
how long the load call took, failed requests, responses matching no single version, p99 latency
during reloads over steady, and peak GPU memory (``nvidia-smi``) or, on CPU, the peak resident memory
of the server and its stubs, over the model size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.lib.reload import measure_reload, random_versions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"])
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--triton-log", metavar="FILE")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop the server
    work = Path(tempfile.mkdtemp(prefix="triton-reload-"))
    result: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "errors": []}
    try:
        x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(7))
        device = "cuda" if args.kind == "KIND_GPU" else "cpu"
        files, expected = random_versions(work / "versions", args.versions, args.width, args.layers, x, device)
        result["baseline"] = measure_reload(
            work, width=args.width, layers=args.layers, kind=args.kind, files=files, expected=expected, x=x,
            swaps=args.swaps, clients=args.clients, atol=args.atol, ready_timeout=args.ready_timeout,
            log=Path(args.triton_log) if args.triton_log else None)
    except Exception as e:  # the JSON keeps the failure
        result["errors"].append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    b = result.get("baseline")
    if b:
        print(f"triton reload: publish->first response median {b['publish_to_first_response_s']['median']:.3f} s, "
              f"errors {b['errors']} torn {b['torn']} p99 during/steady {b['p99_during_over_steady']}, "
              f"peak memory {b['peak_memory_over_model']:.2f}x model")
    for e in result["errors"]:
        print("ERROR", e["error"], file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
