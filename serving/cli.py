"""The ``hotswap`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from serving.errors import HotswapError
from serving.specs import dtype_from_name

Handler = Callable[[argparse.Namespace], int]


def _factory_kwargs(text: str | None) -> dict[str, object]:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise SystemExit("--kwargs must be a JSON object, e.g. '{\"d_model\": 128}'")
    return value


def _write_atomically(tensors: dict, out: Path, metadata: dict[str, str]) -> None:  # type: ignore[type-arg]
    """Write a safetensors file the way the publish protocol recommends: temp name, then rename."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)


def cmd_weights_random(args: argparse.Namespace) -> int:
    from serving.factory import build_module
    from serving.weights.random_state import random_state_dict

    module = build_module(args.factory, _factory_kwargs(args.kwargs))
    dtype = dtype_from_name(args.dtype) if args.dtype else None
    state = random_state_dict(module, args.seed, scale=args.scale, dtype=dtype)
    out = Path(args.output)
    _write_atomically(state, out, {"factory": args.factory, "seed": str(args.seed)})
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {out} ({len(state)} tensors, {nbytes / 1e6:.2f} MB, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotswap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="checkpoint utilities").add_subparsers(dest="sub", required=True)
    rnd = weights.add_parser("random", help="write a valid random checkpoint for a factory")
    rnd.add_argument("--factory", required=True, help="package.module:function returning a torch.nn.Module")
    rnd.add_argument("--kwargs", help="JSON object of factory keyword arguments")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--scale", type=float, default=0.5)
    rnd.add_argument("--dtype", help="cast floating tensors (float16, bfloat16, float32)")
    rnd.add_argument("-o", "--output", required=True)
    rnd.set_defaults(handler=cmd_weights_random)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except HotswapError as e:
        print(f"hotswap: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
