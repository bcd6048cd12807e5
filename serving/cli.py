"""The ``hotswap`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serving.errors import ConfigError, HotswapError, for_model
from serving.specs import TensorSpec, dtype_from_name

if TYPE_CHECKING:
    from serving.triton.server import TritonProcess

Handler = Callable[[argparse.Namespace], int]


def _factory_kwargs(text: str | None) -> dict[str, object]:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise SystemExit("--kwargs must be a JSON object, e.g. '{\"d_model\": 128}'")
    return value


def cmd_weights_random(args: argparse.Namespace) -> int:
    from serving.factory import build_module
    from serving.weights.random_state import random_state_dict
    from serving.weights.writer import write_safetensors

    module = build_module(args.factory, _factory_kwargs(args.kwargs))
    dtype = dtype_from_name(args.dtype) if args.dtype else None
    state = random_state_dict(module, args.seed, scale=args.scale, dtype=dtype)
    out = Path(args.output)
    write_safetensors(state, out, {"factory": args.factory, "seed": str(args.seed)})
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {out} ({len(state)} tensors, {nbytes / 1e6:.2f} MB, seed {args.seed})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a real Triton (from the nvidia-pytriton wheel) on 127.0.0.1 serving a model repository.

    Exits promptly with Triton's reason when a model fails to load; SIGTERM and SIGINT stop Triton and
    every Python stub of it.
    """
    import os
    import signal
    import threading

    from serving.triton.server import ModelLoadError, TritonProcess, models_in, seed_weights

    repo = Path(args.model_repository).resolve()
    env = dict(os.environ)
    env.setdefault("HOTSWAP_WEIGHTS_ROOT", str(Path(args.weights_root).resolve()))
    env.setdefault("HOTSWAP_CACHE_DIR", str(Path(args.cache_dir).expanduser().resolve()))
    seeded = seed_weights(repo, env)
    ports = {k: int(env[v]) for k, v in (("http_port", "TRITON_HTTP_PORT"), ("grpc_port", "TRITON_GRPC_PORT"),
                                         ("metrics_port", "TRITON_METRICS_PORT")) if env.get(v)}
    server = TritonProcess(repo, work_dir=Path(args.work_dir).resolve(), env=env,
                           http_port=ports.get("http_port", 8000), grpc_port=ports.get("grpc_port", 8001),
                           metrics_port=ports.get("metrics_port", 8002))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(foreground=True)
        models = [m.name for m in models_in(repo)]
        failures: list[Exception] = []

        def wait_ready() -> None:  # on a thread: the main thread keeps taking signals
            try:
                server.wait_ready(models, timeout=args.ready_timeout)
            except (TimeoutError, RuntimeError) as e:
                failures.append(e)

        waiter = threading.Thread(target=wait_ready, name="hotswap-serve-ready", daemon=True)
        waiter.start()
        while waiter.is_alive() and not stop.is_set():
            waiter.join(0.2)
        if stop.is_set() and waiter.is_alive():
            return 130
        for error in failures:
            what = "a model failed to load" if isinstance(error, ModelLoadError) else "Triton is not serving"
            print(f"hotswap serve: {what}: {error}", file=sys.stderr, flush=True)
            return 1
        print(_banner(server, seeded, env), flush=True)
        assert server.proc is not None
        while not stop.is_set() and server.proc.poll() is None:
            stop.wait(0.5)
        return server.proc.returncode if server.proc.poll() is not None else 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _banner(s: TritonProcess, seeded: list[tuple[str, Path, bool]], env: dict[str, str]) -> str:
    """What is served and how to use it, built from the repository actually served."""
    lines = ["", f"Triton is serving {', '.join(m for m, _, _ in seeded)} on 127.0.0.1 "
             f"(HTTP {s.http_port}, gRPC {s.grpc_port}, metrics {s.metrics_port}).",
             f"Engine cache: {env['HOTSWAP_CACHE_DIR']}", "Weights folders (publish with `hotswap publish`):"]
    for model, folder, was_seeded in seeded:
        lines.append(f"  {model}: {folder}" + ("   (seeded with a random initial.safetensors)" if was_seeded else ""))
    model, folder, _ = seeded[0] if seeded else ("MODEL", Path("FOLDER"), False)
    lines += ["Try:", f"  hotswap publish CHECKPOINT --to {folder}"]
    request = Path("examples") / f"{model}_request.json"
    if request.is_file():
        lines.append(f"  curl -s -X POST {s.http_url}/v2/models/{model}/infer -d @{request}")
    else:
        lines.append(f"  curl -s {s.http_url}/v2/models/{model}   # inputs and outputs")
    lines += [f"  curl -s {s.metrics_url} | grep hotswap_", f"  hotswap status --metrics-url {s.metrics_url}",
              "Ctrl-C stops the server.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- hotswap watch / hotswap lora


def _input_specs(args: argparse.Namespace) -> tuple[TensorSpec, ...]:
    """``--input NAME:DTYPE:D1,D2`` flags, else the example factories' own specs, else none."""
    from serving.examples import example_build_spec

    if args.input:
        specs = []
        for text in args.input:
            try:
                name, dtype, dims = text.split(":")
                specs.append(TensorSpec(name, dtype_from_name(dtype), tuple(int(d) for d in dims.split(",") if d)))
            except ValueError as e:
                raise SystemExit(f"--input {text!r}: expected NAME:DTYPE:D1,D2 (e.g. TOKENS:int64:16): {e}") from e
        return tuple(specs)
    try:
        return example_build_spec(args.factory).inputs
    except KeyError:
        return ()


def cmd_watch(args: argparse.Namespace) -> int:
    """Serve nothing, but watch a weights folder and hot-swap into an engine (development, non-Triton servers)."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    from serving.metrics import prometheus_metrics
    from serving.service import HotswapService
    from serving.settings import parse_settings

    folder = Path(args.folder).expanduser().resolve()
    inputs = _input_specs(args)
    params = {"model_factory": args.factory, "factory_kwargs": json.dumps(_factory_kwargs(args.kwargs)),
              "weights_dir": str(folder), **WATCH_DEFAULTS, **_setting_flags(args)}
    if not inputs:
        params["canary"] = "off"  # nothing to run a canary on
    if args.cache_dir:
        params["engine_cache_dir"] = str(Path(args.cache_dir).expanduser().resolve())
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry, {"model": args.name})
    with for_model(args.name):
        settings = parse_settings(params, model_name=args.name, device=args.device)
        service = HotswapService(settings, inputs, (), args.max_batch, metrics)
        report = service.start(require_weights=False)
    rejected = service.watcher.rejected if service.watcher else {}
    print(f"initial weights: {report.version if report else 'none'}"
          f"{f' (rejected: {dict(rejected)})' if rejected else ''}", flush=True)
    server = None
    if args.metrics_port is not None:
        try:
            server, _ = start_http_server(args.metrics_port, addr=args.metrics_addr, registry=registry)
        except OSError as e:
            service.close()
            raise ConfigError(f"--metrics-port {args.metrics_port} on {args.metrics_addr}: {e}; choose a free port "
                              "(0: any)") from e
        print(f"metrics on http://{args.metrics_addr}:{server.server_port}/metrics", flush=True)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    print(f"watching {folder} ({settings.watch_mode}); publish with `hotswap publish SRC --to {folder}` (or write "
          "NAME.tmp, then rename it); Ctrl-C stops",
          flush=True)
    try:
        stop.wait(args.exit_after)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        live = service.coordinator.live_version if service.coordinator else None
        rejected = dict(service.watcher.rejected) if service.watcher else {}
        service.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    print(f"stopped; live weights: {live}; rejected: {rejected or 'none'}", flush=True)
    return 0


def cmd_lora_random(args: argparse.Namespace) -> int:
    from serving.factory import build_module
    from serving.weights.lora import random_adapter, save_adapter

    module = build_module(args.factory, _factory_kwargs(args.kwargs))
    targets = [t for t in args.targets.split(",") if t]
    try:
        config, tensors = random_adapter(module, targets=targets, r=args.r, alpha=args.alpha, seed=args.seed,
                                         std=args.std, use_rslora=args.rslora)
    except ValueError as e:
        raise SystemExit(f"hotswap lora random: {e}") from e
    out = save_adapter(Path(args.output), config, tensors)
    print(f"wrote {out} (PEFT adapter: {len(tensors) // 2} modules, r={args.r}, lora_alpha={args.alpha}, "
          f"seed {args.seed})")
    return 0


#: where ``hotswap watch`` differs from a served model's defaults: start quickly, without compiling
WATCH_DEFAULTS = {"engine": "eager", "canary": "finite"}
#: settings with flags of their own meaning in ``hotswap watch`` (not generated)
_OWN_FLAGS = ("model_factory", "factory_kwargs", "weights_dir", "engine_cache_dir")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of :data:`serving.settings.SETTINGS` that names one (type, choices, doc from the table)."""
    from serving.settings import SETTINGS

    for s in SETTINGS:
        if s.flag is None or s.name in _OWN_FLAGS:
            continue
        default = WATCH_DEFAULTS.get(s.name, s.default)
        help_text = f"{s.doc} (config.pbtxt: {s.name}; default {default or s.default_text()})".replace("%", "%%")
        if s.kind == "bool":
            parser.add_argument(s.flag, dest=s.name, action="store_const", const="true", help=help_text)
        else:
            kind = {"int": int, "float": float}.get(s.kind, str)
            parser.add_argument(s.flag, dest=s.name, type=kind, choices=s.choices or None, help=help_text)


def _setting_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as flags, as config.pbtxt would give them."""
    from serving.settings import SETTINGS

    return {s.name: str(getattr(args, s.name)) for s in SETTINGS
            if s.flag is not None and s.name not in _OWN_FLAGS and getattr(args, s.name, None) is not None}


def cmd_status(args: argparse.Namespace) -> int:
    """Models x instances: live version, last successful refit, rejections, watcher errors (from /metrics)."""
    import time
    import urllib.error

    from serving.triton.scrape import scrape
    from serving.triton.status import render, status_rows

    try:
        samples = scrape(args.metrics_url)
    except (OSError, urllib.error.URLError) as e:
        print(f"hotswap status: cannot read {args.metrics_url}: {e}", file=sys.stderr)
        return 1
    print(render(status_rows(samples), time.time()))
    return 0


def _add_watch_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    watch = sub.add_parser("watch", help="watch a weights folder and hot-swap into an engine, outside Triton")
    watch.add_argument("--factory", required=True, help="package.module:function returning a torch.nn.Module")
    watch.add_argument("--kwargs", help="JSON object of factory keyword arguments")
    watch.add_argument("--folder", required=True, help="the weights folder to watch")
    watch.add_argument("--name", default="model", help="model name (the metrics' model label)")
    watch.add_argument("--device", default="cpu")
    watch.add_argument("--input", action="append", help="NAME:DTYPE:D1,D2 (repeat; default: the example's inputs)")
    _add_setting_flags(watch)
    watch.add_argument("--max-batch", type=int, default=8, help="largest batch the engine is built for")
    watch.add_argument("--cache-dir", help="stripped-engine cache (default: $HOTSWAP_CACHE_DIR, ~/.cache/hotswap)")
    watch.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)")
    watch.add_argument("--metrics-addr", default="127.0.0.1")
    watch.add_argument("--exit-after", type=float, help="stop after this many seconds (default: run until signalled)")
    watch.set_defaults(handler=cmd_watch)

    lora = sub.add_parser("lora", help="LoRA adapter utilities").add_subparsers(dest="sub", required=True)
    rnd = lora.add_parser("random", help="write a valid random PEFT LoRA adapter directory for a factory")
    rnd.add_argument("--factory", required=True, help="package.module:function returning a torch.nn.Module")
    rnd.add_argument("--kwargs", help="JSON object of factory keyword arguments")
    rnd.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module name suffixes")
    rnd.add_argument("--r", type=int, default=4)
    rnd.add_argument("--alpha", type=float, default=8.0)
    rnd.add_argument("--rslora", action="store_true", help="use_rslora: scale alpha/sqrt(r)")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--std", type=float, default=0.05)
    rnd.add_argument("-o", "--output", required=True, help="the adapter directory to create (must not exist)")
    rnd.set_defaults(handler=cmd_lora_random)


def _add_publish_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``hotswap publish SRC --to FOLDER [--version V]`` (serving.publish.publish)."""

    def cmd_publish(args: argparse.Namespace) -> int:
        from serving.publish import publish

        dest = publish(args.src, args.to, version=args.version, manifest=not args.no_manifest)
        print(f"published {args.src} as {dest}")
        return 0

    pub = sub.add_parser("publish", help="publish a checkpoint file or directory into a weights folder (copy under a "
                                         "hidden name, MANIFEST.json for directories, fsync, rename)")
    pub.add_argument("src", help="a checkpoint file, a sharded or save_pretrained directory, or a PEFT adapter")
    pub.add_argument("--to", required=True, help="the weights folder the server watches")
    pub.add_argument("--version", help="the version name (default: the source's name); the name of an older "
                                       "version publishes it again (a rollback)")
    pub.add_argument("--no-manifest", action="store_true", help="copy a directory without writing MANIFEST.json")
    pub.set_defaults(handler=cmd_publish)


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

    serve = sub.add_parser("serve", help="run a real Triton server on 127.0.0.1 for a model repository")
    serve.add_argument("--model-repository", default="model_repository")
    serve.add_argument("--weights-root", default="weights",
                       help="parent of the per-model weights folders (env HOTSWAP_WEIGHTS_ROOT wins)")
    serve.add_argument("--cache-dir", default="~/.cache/hotswap/engines",
                       help="stripped-engine cache (env HOTSWAP_CACHE_DIR wins)")
    serve.add_argument("--work-dir", default=".run", help="backend directory and logs")
    serve.add_argument("--ready-timeout", type=float, default=600.0)
    serve.set_defaults(handler=cmd_serve)

    status = sub.add_parser("status", help="what each model instance serves, from Triton's metrics endpoint")
    status.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    status.set_defaults(handler=cmd_status)

    _add_watch_commands(sub)
    _add_publish_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    from serving.factory import add_search_paths

    add_search_paths(os.getcwd())  # --factory mymodule:fn works from the folder the user is in
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
