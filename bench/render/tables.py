"""The measurement tables of docs/benchmarks.md, one section per kind of result file in ``bench/results/``.
Each table names the JSON it shows and the command that wrote it (the JSON's ``command``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.render.fmt import errors, files, link, load, machine, ms, num, secs, sources, table, to_measure
from bench.render.soak import soak

RESULTS = Path(__file__).resolve().parents[1] / "results"


def refit_cpu(results: Path) -> str:
    paths = files("refit-*.json", results)
    if not paths:
        return to_measure("**Refit, CPU**", "python bench/refit.py --json")
    out = ["**Refit, CPU**: a new checkpoint file (page-cached) to the live engine, median of the "
           "repeats; the limit is reading the same file's tensors and copying the bytes into "
           "preallocated tensors, in the same run. The stages are the README's (medians each, so they need not "
           "add up to the total); double-buffered, the tensors are streamed into the standby slot's own and "
           "checked for NaN/Inf on the way, under `transfer`.\n\n"]
    rows, startup = [], []
    for p in paths:
        doc = load(p)
        for r in doc["refit"]:
            st = r["stages_s"]
            rows.append([r["engine"], f"{r['model_mb']:.1f} MB", r["repeats"], secs(r["refit_s"]),
                         secs(r["copy_limit_s"]), f"{r['ratio']:.2f}x", secs(st.get("read")), secs(st.get("validate")),
                         secs(st.get("transfer")), secs(st.get("refit")), secs(st.get("swap")), machine(doc), link(p)])
        s = doc.get("startup")
        if s:
            startup.append(f"AOTInductor cold build of the example transformer {secs(s['cold_build_s'])}; cache hit "
                           f"in {s['hit_in']} {secs(s['cache_hit_s'])} ({s['speedup']:.0f}x) ({link(p)})")
    out.append(table(["engine", "model", "repeats", "file → live", "read + copy limit", "ratio", "read", "validate",
                      "transfer", "refit", "swap", "machine", "results"], rows))
    if startup:
        out.append("\n**Engine startup**: " + "; ".join(startup) + ".\n")
    out.append("\n" + sources(paths))
    return "".join(out)


def publish(results: Path) -> str:
    paths = files("publish-*.json", results)
    if not paths:
        return to_measure("**Publish**", "python bench/publish.py --json")
    rows = []
    for p in paths:
        doc = load(p)
        m, c, med = doc["machine"], doc["config"], doc["median_s"]
        rows.append([f"{m['device']}, {c['strategy']}" + (", fast path" if c.get("fast_path") else ""),
                     f"{doc['checkpoint_mb']:.0f} MB", len(doc["trials_s"]), secs(med["first_response"]),
                     secs(med["event"]), secs(med["detect"]), secs(med["hash"]), secs(med["read"]),
                     secs(med["refit"]), machine(doc), link(p)])
    return ("**Publish → first response** through the real watcher (`bench/publish.py`): a new version renamed "
            "into the watched folder while a client sends requests back to back; medians over the trials. "
            "`event`: the inotify event; `detect`: until the worker starts on it; `hash`: the version's "
            "content hash; `read`: read and validate; `refit`: transfer, refit, canary, swap.\n\n"
            + table(["device, strategy", "checkpoint", "trials", "rename → first response", "event", "detect",
                     "hash", "read", "refit", "machine", "results"], rows)
            + "\n" + sources(paths))


def _swap_row(label: str, strategy: str, r: Mapping[str, Any], doc: Mapping[str, Any], p: Path) -> list[object]:
    live = r.get("publish_to_live_s")
    return [label, strategy, r["swaps"], r["requests"], r["errors"], r["torn"],
            f"{ms(r['steady_p50_ms'])} / {ms(r['steady_p99_ms'])}", f"{ms(r['swap_p50_ms'])} / {ms(r['swap_p99_ms'])}",
            f"{r['swap_p99_ms'] / r['steady_p99_ms']:.2f}x",
            f"{secs(live['median'])} / {secs(live['max'])}" if live else "n/a", machine(doc), link(p)]


def zero_downtime(results: Path) -> str:
    cpu, gpu = files("serve-swap-*.json", results), files("gpu-serve-swap-*.json", results)
    rows = []
    for p in cpu:
        doc = load(p)
        rows.append(_swap_row(f"`{doc['model']}`, {doc['clients']} HTTP clients", "`model_repository/`'s",
                              doc, doc, p))
    for p in gpu:
        doc = load(p)
        m = doc["model"]
        label = (f"`{m['factory']}` {m['bytes'] / 1e9:.2f} GB {m['dtype']}, {m['engine']}, {m['instance']}, "
                 f"4 gRPC clients")
        if m.get("version_output") is False:
            label += " (no version output: responses matched by their values only)"
        rows.extend(_swap_row(label, s, r, doc, p) for s, r in doc["strategies"].items())
    if not rows:
        return to_measure("**Zero downtime**", "python bench/serve_swap.py --json")
    return ("**Zero downtime on a real Triton** (`bench/serve_swap.py`, `bench/gpu_serve_swap.py`): clients send "
            "requests throughout while new versions are published; every response is compared with each "
            "version's expected output, and a torn response is one that matches none. Target: 0 errors, 0 torn, "
            "p99 during swaps ≤ 1.5x steady.\n\n"
            + table(["model, clients", "strategy", "swaps", "requests", "errors", "torn", "steady p50 / p99",
                     "during swaps p50 / p99", "p99 ratio", "publish → live median / max", "machine", "results"],
                    rows)
            + "\n" + sources(cpu + gpu))


def gpu_refit(results: Path) -> str:
    paths = files("gpu-refit-*.json", results)
    if not paths:
        return to_measure("**GPU fast path** (file → live by size, swap pause, the host path beside it, an fp32 "
                          "checkpoint into a bf16 engine, in place for a model larger than half the GPU)",
                          "bash bench/gpu_run.sh refit", "bash bench/gpu_run.sh big")
    rows, host = [], []
    for p in paths:
        doc = load(p)
        runs = list(doc["runs"]) + ([doc["big_in_place"]] if "runs" in doc.get("big_in_place", {}) else [])
        for r in runs:
            cast = f"{r['checkpoint_dtype']} → {r['dtype']}" if r.get("checkpoint_dtype") != r.get("dtype") else r.get(
                "dtype")
            rows.append([r["engine"], r["strategy"], transfer(r), f"{r['bytes'] / 1e9:.2f} GB", cast,
                         secs(r["total_s_median"]), num(r["effective_gbps"], " GB/s"), secs(r.get("pinned_limit_s")),
                         num(r.get("ratio_to_pinned_limit"), "x"), ms(r["pause_ms_median"]),
                         ms((r.get("client") or {}).get("during_refit_max_ms")),
                         num(r.get("peak_over_model"), "x"), machine(doc), link(p)])
        reg = doc.get("registration")
        if reg:
            rates = ", ".join(f"{k} thread(s) {v:.1f}" for k, v in reg["register_gbps"].items())
            host.append(f"The retired `registered` transfer, measured before it was removed: registering "
                        f"page-cached pages with CUDA (`cudaHostRegister`, {reg['window_bytes'] >> 20} "
                        f"MiB at a time) runs at {rates} GB/s; DMA out of pages registered beforehand "
                        f"{num(reg.get('dma_from_registered_gbps'), ' GB/s')}; unregistering "
                        f"{num(max(reg['unregister_gbps'].values()), ' GB/s')} ({link(p)})")
        b = doc.get("baseline")
        if b and b.get("host_path_total_s") is not None:
            host.append(f"{b['bytes'] / 1e9:.2f} GB through the host path (read to host memory, then `.to(device)`): "
                        f"{secs(b['host_path_total_s'])} ({num(b['host_path_gbps'], ' GB/s')}) ({link(p)})")
    out = ("**GPU fast path** (`bench/gpu_refit.py`): a checkpoint directory renamed in, to the first response "
           "served with it, median over the repeats; the limit is the same bytes copied from pinned host memory "
           "to the device in the same run. Targets: ≥ 40 GB/s for 4 GB and more, within 1.4x of the limit; swap "
           "pause ≤ 1 ms double-buffered.\n\n"
           + table(["engine", "strategy", "transfer", "size", "dtype", "file → first response", "effective",
                    "pinned limit", "x limit", "swap pause", "slowest request during a refit", "peak memory / model",
                    "machine", "results"], rows))
    if host:
        out += "\n" + "".join(f"* {h}\n" for h in host)
    failed = errors(paths)
    return out + ("\n" + failed if failed else "") + "\n" + sources(paths)


def transfer(run: Mapping[str, Any]) -> str:
    """A run's ``weights_transfer``, with what ``auto`` came to; ``registered`` (an older run's) was retired."""
    asked, used = run.get("transfer", "pinned"), run.get("transfer_used")
    if asked == "registered":
        return "registered (retired)"
    return f"auto → {used}" if asked == "auto" and used else asked


def _median(v: float | Mapping[str, Any] | None) -> float | None:
    """A figure recorded either as a number or as ``{"median": ...}``."""
    return v.get("median") if isinstance(v, Mapping) else v


def breakdown(stages_ms: dict[str, float]) -> str:
    """The stages that took a millisecond or more, in pipeline order ("other": event delivery, the answer)."""
    order = ("settle", "hash", "read", "validate", "merge", "prescan", "drain", "transfer", "refit", "verify",
             "swap", "other")
    return ", ".join(f"{k} {stages_ms[k]:.0f}" for k in order if stages_ms.get(k) is not None and stages_ms[k] >= 1)


def phase_latency(r: Mapping[str, Any]) -> str:
    """Request latencies outside swaps and while the checkpoint streams (``latency_by_phase_ms``)."""
    phases = r.get("latency_by_phase_ms") or {}
    if "steady" not in phases or "transfer" not in phases:
        return "n/a"
    s, t = phases["steady"], phases["transfer"]
    return f"{s['p50']:.1f} / {s['p99']:.1f} ms, {t['p50']:.1f} / {t['p99']:.1f} ms"


def gpu_publish(results: Path) -> str:
    paths = files("gpu-publish-*.json", results)
    if not paths:
        return to_measure("**Publish through Triton by model size, beside Triton's own reload**",
                          "bash bench/gpu_run.sh publish")
    rows = []
    for p in paths:
        doc = load(p)
        for size in doc["sizes"]:
            base = size.get("baseline") or {}
            served = [r for r in (size.get("hotswap") or {}).values() if isinstance(r, dict)]
            for strategy, r in (size.get("hotswap") or {}).items():
                if not isinstance(r, dict) or "publish_to_first_response_s" not in r:
                    continue
                # the GPU's memory is sampled as a whole: with several models loaded it is not one model's peak
                peak = num(r.get("peak_memory_over_model"), "x") if len(served) == 1 else \
                    f"n/a ({len(served)} models loaded)"
                cache = ", from disk (evicted from the page cache)" if size.get("cold") else ""
                if r.get("swaps_detail") and not any("rename_at" in d for d in r["swaps_detail"]):
                    cache += " (an earlier bench: the first response seen by an extra probe client)"
                rows.append([f"{size['model_bytes'] / 1e9:.2f} GB{cache}", strategy,
                             secs(_median(r["publish_to_first_response_s"])), num(r.get("stream_gbps"), " GB/s"),
                             num(size.get("pinned_limit_gbps"), " GB/s"), breakdown(r.get("stages_ms_median") or {}),
                             r["errors"], r["torn"],
                             num(r.get("p99_during_over_steady"), "x"), phase_latency(r), peak,
                             secs(_median(base.get("publish_to_first_response_s"))),
                             f"{base['errors']} / {base['torn']}" if base else "n/a",
                             num(base.get("p99_during_over_steady"), "x"), machine(doc), link(p)])
    return ("**Publish through Triton by model size** (`bench/gpu_publish.py`): rename → first response on a "
            "`KIND_GPU` instance under client load (float32 MLP, eager engine), beside Triton's own reload "
            "of the same versions (`bench/triton_reload.py`: a plain Python-backend model, a new version directory "
            "and the repository load API); `stream` is the file → device rate of the refit, `pinned limit` the "
            "pinned host → device copy rate of the same run. The first response is the first answer with the new "
            "weights that a load client gets; the latency columns group requests by the swap phase they overlapped "
            "most. A strategy followed by a name is one of several models served side by side with other settings "
            "(`--variant`: `tN` is `weights_reader_threads=N`, `r64` is `weights_read_bytes` of 64 MiB).\n\n"
            + table(["model", "strategy", "rename → first response", "stream", "pinned limit",
                     "where the time goes (median ms)", "errors", "torn",
                     "p99 ratio", "requests p50 / p99: steady, during the transfer", "peak memory / model",
                     "Triton reload: rename → first response",
                     "reload: errors / torn", "reload: p99 ratio", "machine", "results"], rows)
            + ("\n" + errors(paths) if errors(paths) else "") + "\n" + sources(paths))


def _model_label(m: Mapping[str, Any]) -> str:
    graphs = ", CUDA graphs" if m.get("cuda_graphs") else ""
    return (f"`{m['factory']}` d_model {m['d_model']}, {m['n_layers']} layers, {m['dtype']}, {m['device']}"
            f"{graphs}")


def compiled_engines(results: Path) -> str:
    starts, lats = files("inductor-startup-*.json", results), files("engine-latency-*.json", results)
    if not starts and not lats:
        return to_measure("**Compiled engines**", "python bench/inductor_startup.py", "python bench/engine_latency.py")
    out = []
    if starts:
        rows = []
        for p in starts:
            doc = load(p)
            cold, hit = doc["cold"], doc["cached"]
            rows.append([_model_label(doc["model"]), secs(cold["build_s"]), secs(hit["build_s"]),
                         f"{cold['build_s'] / hit['build_s']:.1f}x", hit["detail"], machine(doc), link(p)])
        out.append("**Inductor engine startup**: the engine build in a fresh process with an empty compile cache, "
                   "cold (trace, generate and compile code, warm up every graph, refit check, store the entry) and "
                   "from the stripped-engine cache (the compiler's artifacts, no weights).\n\n"
                   + table(["model", "cold build", "from the cache", "speed-up", "cache hit", "machine", "results"],
                           rows))
    if lats:
        rows = []
        for p in lats:
            doc = load(p)
            lat, ratio = doc["latency"], doc.get("refittable_over_baked") or {}
            for engine, v in lat.items():
                r = ratio.get(engine) or {}
                versus = " (baked in without CUDA graphs)" if r and doc["model"].get("cuda_graphs") else ""
                rows.append([_model_label(doc["model"]), f"`{engine}`", ms(v["batch_1_ms"]), ms(v["batch_8_ms"]),
                             ", ".join(f"{r[k]:.2f}x" for k in ("batch_1_ms", "batch_8_ms") if k in r) + versus,
                             machine(doc), link(p)])
        out.append("**What refittability costs**: median latency of the refittable engines (`inductor`: weights "
                   "as graph inputs; `aoti`: a package without weights) against the same engines with the weights "
                   "baked in (`inductor_frozen`: `freezing` on; `aoti_baked`: constants in the `.so`), and eager; "
                   "one process, same weights and inputs, engines timed in turns. Goal: refittable within 1.1x of "
                   "baked in; compiled faster than eager on the GPU.\n\n"
                   + table(["model", "engine", "batch 1", "batch 8", "refittable / baked in (1, 8)", "machine",
                            "results"], rows))
    return "\n".join(out) + "\n" + sources(starts + lats)


def real_models(results: Path) -> str:
    paths = files("real-refit-*.json", results)
    if not paths:
        return to_measure("**Real architectures**", "python bench/real_refit.py --json real-refit.json")
    rows = []
    for p in paths:
        doc = load(p)
        copied = "copy" in str(doc.get("publish_mode", ""))
        for r in doc["runs"]:
            trt = r.get("torch_tensorrt_refit_s")
            rows.append([r["model"], f"`{r['engine']}`", r["device"], f"{r['checkpoint_bytes'] / 1e6:.0f} MB",
                         secs(r["build_s"]), secs(r["refit_s"]),
                         secs(r["publish_to_live_s"]) + (" (with the copy)" if copied else ""),
                         secs(trt) if trt else "n/a", machine(doc), link(p)])
    return ("**Real architectures** (`bench/real_refit.py`): full-size ResNet-18/50 (transformers' classes on CPU, "
            "torchvision's as `tv-` on the GPU) and BERT-base, random weights; `file → live`: a page-cached "
            "`model.safetensors` to the live engine (read, validate, transfer, refit, canary, swap), median; "
            "`publish → live`: `serving.publish.publish(..., link=True)` of a `save_pretrained`-like directory "
            "into the watched folder (hard links: timed from the rename; its `MANIFEST.json` sha256s are "
            "verified before it goes live) until it serves. Beside them, the refit times Torch-TensorRT documents for "
            "`refit_module_weights` on the same architectures (their hardware, a TensorRT engine: context, not a "
            "measurement here).\n\n"
            + table(["model", "engine", "device", "checkpoint", "engine build", "file → live", "publish → live",
                     "Torch-TensorRT refit (documented)", "machine", "results"], rows)
            + ("\n" + errors(paths) if errors(paths) else "") + "\n" + sources(paths))


def aoti_loader(results: Path) -> str:
    paths = files("aoti-load-probe-*.json", results)
    if not paths:
        return ""
    lines = []
    for p in paths:
        doc = load(p)
        verdicts = "; ".join(v["verdict"] for v in doc["variants"])
        lines.append(f"* {machine(doc)}, {doc['package_device']} package: {verdicts} ({link(p)})\n")
    return ("**AOTInductor package loaders** (`bench/aoti_load_probe.py`, each variant in a child process):\n\n"
            + "".join(lines) + "\n" + sources(paths))


def loaders(results: Path) -> str:
    """Weight loaders side by side (``bench/loaders.py``): one row per loader and setting."""
    paths = files("loaders-*.json", results)
    if not paths:
        return to_measure("**Weight loaders** (a checkpoint into preallocated GPU tensors: the pinned ring, KvikIO, "
                          "fastsafetensors, the Run:ai streamer, `safe_open`)", "bash bench/gpu_run.sh loaders")
    rows, skipped = [], []
    for p in paths:
        doc = load(p)
        for r in loader_rows(p, doc):
            name = f"`{r['name']}`" + ("" if r.get("verified", True) else " (wrong bytes)")
            threads = "library's own" if r["threads"] is None else r["threads"]
            rows.append([name, threads, size(r["task_bytes"]), num(r["gbps"], " GB/s"),
                         num(r["cpu_s_per_gb"], " s"), ms(r["p99_steady_ms"]), ms(r["p99_during_ms"]), machine(doc),
                         link(p)])
        skipped += [f"* {link(p)}, `{s['name']}`: skipped: {s['reason']}\n" for s in doc.get("skipped") or []]
    return ("**Weight loaders** (`bench/loaders.py`): a checkpoint read into preallocated device memory by each "
            "loader, the rate, the CPU time it took per GB, and the p99 latency of requests served beside it; "
            "`task size` is KvikIO's (`weights_task_bytes`).\n\n"
            + table(["loader", "threads", "task size", "rate", "CPU per GB", "requests p99 steady",
                     "requests p99 while loading", "machine", "results"], rows)
            + ("\n" + "".join(skipped) if skipped else "")
            + ("\n" + errors(paths) if errors(paths) else "") + "\n" + sources(paths))


def instances(results: Path) -> str:
    """Several instances on one GPU (``bench/gpu_instances.py``): every instance live, and the bytes read."""
    paths = files("gpu-instances-*.json", results)
    if not paths:
        return to_measure("**Instances on one GPU** (rename → every instance serving the new version, and the "
                          "bytes their stubs read)", "python3 -m bench.gpu_instances --json "
                          "$OUT/gpu-instances-h200.json")
    rows = []
    for p in paths:
        doc = load(p)
        for c in doc["counts"]:
            rows.append([c["instances"], size_gb(doc["model_bytes"]), secs(c["all_live_s"]["median"]),
                         secs(c["all_live_s"]["max"]), len(c["swaps"]), num(c["read_until_live_over_model"], "x"),
                         num(c["read_until_hashed_over_model"], "x"), machine(doc), link(p)])
    return ("**Instances on one GPU** (`bench/gpu_instances.py`): one model served by N instances of one server "
            "(`instance_group` count N, double buffer, the default weight transfer); a version renamed in, then "
            "the time until every instance reports it live on the metrics endpoint, and the bytes the instances' "
            "stubs read from files (`rchar`), against the model's size: each instance reads the checkpoint "
            "itself, the baseline for reading it once per host.\n\n"
            + table(["instances", "model", "every instance live (median)", "max", "swaps",
                     "read until live", "read until hashed", "machine", "results"], rows)
            + ("\n" + errors(paths) if errors(paths) else "") + "\n" + sources(paths))


def size_gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def size(nbytes: int | None) -> str:
    """Bytes as MiB or KiB; n/a for None."""
    if nbytes is None:
        return "n/a"
    return f"{nbytes / (1 << 20):g} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:g} KiB"


#: the fields of a row of a loaders-*.json (``bench/loaders.py``); ``threads`` and ``task_bytes`` may be None
#: (a library that decides them itself, a loader without tasks)
LOADER_FIELDS = ("name", "threads", "task_bytes", "gbps", "cpu_s_per_gb", "p99_during_ms", "p99_steady_ms")


def loader_rows(path: Path, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a loaders-*.json, each checked for every field of :data:`LOADER_FIELDS`."""
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{path.name}: a loaders result needs 'rows', a list of {{{', '.join(LOADER_FIELDS)}}}")
    for i, r in enumerate(rows):
        missing = [f for f in LOADER_FIELDS if f not in r]
        if missing:
            raise ValueError(f"{path.name}: row {i} ({r.get('name', '?')}) has no {', '.join(missing)}")
    return rows


SECTIONS: tuple[Callable[[Path], str], ...] = (refit_cpu, publish, zero_downtime, soak, gpu_refit, gpu_publish,
                                               instances, loaders, compiled_engines, real_models, aoti_loader)
#: the result files each section shows (every JSON in bench/results/ must match one)
SECTION_FILES = ("refit-*.json", "publish-*.json", "serve-swap-*.json", "gpu-serve-swap-*.json", "soak-*.json",
                 "gpu-refit-*.json", "gpu-publish-*.json", "gpu-instances-*.json", "loaders-*.json",
                 "inductor-startup-*.json", "engine-latency-*.json", "real-refit-*.json", "aoti-load-probe-*.json")


def measured(results: Path = RESULTS) -> str:
    """The tables of docs/benchmarks.md: every section, from the JSON files in ``results``."""
    shown = {p for pattern in SECTION_FILES for p in results.glob(pattern)}
    unshown = sorted(p.name for p in results.glob("*.json") if p not in shown)
    if unshown:
        raise ValueError(f"{', '.join(unshown)}: no section of docs/benchmarks.md shows these results; name them "
                         f"like one of {', '.join(SECTION_FILES)} or add a section to bench/render/tables.py")
    return "\n".join(s for s in (section(results) for section in SECTIONS) if s)
