"""The soak's table and picture (``bench/soak.py``, ``bench/results/soak-*.json``): errors, torn responses and
every resource series against swaps, each series' growth after warm-up against the target."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.render.fmt import files, link, load, machine, num, secs, sources, table, to_measure

#: the panels of the picture: title, the series' last name part(s) it draws, the unit it shows them in, and
#: whose series (``stubs``: every model instance's, ``server``: tritonserver's, "": all)
PANELS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("stubs' resident memory (MB): all, anonymous", ("rss_bytes", "rss_anon_bytes"), "MB", "stubs"),
    ("server's resident memory (MB): all, anonymous", ("rss_bytes", "rss_anon_bytes"), "MB", "server"),
    ("open file descriptors (of deleted files)", ("fds", "deleted_fds"), "", ""),
    ("threads", ("threads",), "", ""),
    ("locked, pinned, NVIDIA-mapped, deleted-file mapped (MB)", ("vm_lck_bytes", "vm_pin_bytes", "nvidia_mapped_bytes",
                                                                "pinned_pool_used_bytes", "deleted_mapped_bytes"),
     "MB", ""),
    ("GPU memory (MB)", ("used_bytes", "gpu_bytes"), "MB", ""),
    ("files and folders left", ("server_tmp", "hotswap_work_dirs", "engine_cache", "weights_leftovers"), "", ""),
    ("hotswap series on /metrics", ("hotswap_series",), "", ""),
)
#: series that are not a process's
GROUPS = ("files", "metrics", "triton", "gpu")
SHOWN = {"MB": 1e6, "": 1.0}


def _runs(results: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, load(p)) for p in files("soak-*.json", results)]


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1e6:.1f} MB" if unit == "bytes" else f"{v:g}"


def _warm(s: Mapping[str, Any], swaps: Sequence[int], warmup: int) -> float | None:
    """The series' first value at or after the warm-up."""
    return next((v for x, v in zip(swaps, s["values"], strict=True) if x >= warmup), None)


def _models(doc: Mapping[str, Any]) -> str:
    m = doc["models"]
    if m.get("factory"):
        return f"`{m['factory']}` {sum(m['bytes'].values()) / 1e9:.2f} GB {m['dtype']}, {m['engine']}, {m['instance']}"
    return ", ".join(f"`{n}`" for n in m["names"]) + " (`model_repository/`)"


def soak(results: Path) -> str:
    """The soak section of docs/benchmarks.md: one headline row per run, then each run's series."""
    runs = _runs(results)
    if not runs:
        return to_measure("**Soak**", "python3 -m bench.soak --json bench/results/soak-cpu2.json")
    head, detail = [], []
    for p, doc in runs:
        series = doc["series"]
        flat = [v["flat"] for v in series.values() if v["flat"] is not None]
        live = doc["publish_to_live_s"]
        adapters = sum(n for k, n in doc["publishes"].items() if k.startswith("adapter"))
        head.append([_models(doc), doc["clients"], doc["swaps"], adapters, secs(doc["duration_s"]), doc["requests"],
                     doc["errors"], doc["torn"], f"{secs(live['median'])} / {secs(live['max'])}",
                     f"{sum(flat)} of {len(flat)}", "**met**" if doc["met"] else "**not met**", machine(doc), link(p)])
        rows = []
        swaps = [s["swap"] for s in doc["samples"]]
        for name, s in series.items():
            growth = s["growth_pct_per_100_swaps"]
            verdict = "yes" if s["flat"] else "n/a" if s["flat"] is None else "**no**"
            rows.append([f"`{name}`", _value(_warm(s, swaps, doc["warmup_swaps"]), s["unit"]),
                         _value(s["values"][-1] if s["values"] else None, s["unit"]),
                         num(growth, " %") if growth is not None else s.get("why", "n/a"), verdict])
        detail.append(f"\nSeries of {link(p)} ({doc['swaps']} swaps, sampled every {doc['sample_every']}, growth "
                      f"over the samples from swap {doc['warmup_swaps']} on):\n\n"
                      + table(["series", "after warm-up", "at the end", "growth per 100 swaps", "< 1 %"], rows))
    return ("**Soak** (`bench/soak.py`): a real Triton under constant gRPC client load while new random versions "
            "are published one after another, with the tools a user has in turn, and periodically a LoRA adapter "
            "on a model's live base, taken off by its next swap; older versions are deleted from the folder after "
            "each swap. Every response must match the reference output of the version it names. Per Triton stub "
            "process (a model instance) and for the server, resident memory, open files (and deleted files still "
            "held), threads and locked or pinned memory are sampled with GPU memory, hotswap's series on /metrics "
            "and the files left in the temporary, cache and weights folders: the smallest of three readings 0.2 s "
            "apart, every N swaps once each model's last three swaps installed new versions (an adapter's pristine "
            "weights are another state). Target: 0 errors, 0 torn, every series growing under 1 % of its level per "
            "100 swaps after warm-up (least-squares slope).\n\n"
            + table(["models", "clients", "swaps", "of them adapters", "duration", "requests", "errors", "torn",
                     "publish → live median / max", "series flat", "target", "machine", "results"], head)
            + "".join(detail) + "\n" + sources([p for p, _ in runs]))


def soak_pictures(paths: Sequence[Path]) -> Iterator[Any]:
    """One picture per soak run: every series against swaps, one panel per measure, the warm-up shaded."""
    from bench.render.figures import HOTSWAP, OTHER, RELOAD, Picture

    colors = [HOTSWAP[0], RELOAD[0], *OTHER, HOTSWAP[1], RELOAD[1], "#555555", "#b03060"]
    for p in paths:
        doc = load(p)

        def draw(fig: Any, doc: Mapping[str, Any] = doc) -> None:
            axes = fig.subplots(3, 3, sharex=True).flatten()
            swaps = [s["swap"] for s in doc["samples"]]
            ax = axes[0]
            ax.plot(swaps, [s["errors"] for s in doc["samples"]], color=RELOAD[0], marker=".", label="errors")
            ax.plot(swaps, [s["torn"] for s in doc["samples"]], color=HOTSWAP[0], marker=".", ls="--", label="torn")
            ax.set_ylim(0, max(1, *(s["errors"] + s["torn"] for s in doc["samples"])) * 1.1)
            ax.set_title("errors, torn responses (so far)", fontsize=9)
            ax.legend(fontsize=7)
            for ax, panel in zip(axes[1:], PANELS, strict=True):
                _panel(ax, doc, swaps, panel, colors)
            for ax in axes:
                ax.axvspan(0, doc["warmup_swaps"], color="#dddddd", alpha=0.5, lw=0)
                ax.tick_params(labelsize=7)
            for ax in axes[6:]:
                ax.set_xlabel("swaps", fontsize=8)
            fig.suptitle(f"Soak: {doc['swaps']} swaps in {secs(doc['duration_s'])}, {doc['requests']:,} requests, "
                         f"{doc['errors']} errors, {doc['torn']} torn ({machine(doc)}); shaded: warm-up", fontsize=10)

        yield Picture(p.stem, f"resources against swaps through a {doc['swaps']}-swap soak",
                      "Every resource the soak samples against swaps (small multiples; one line per process or "
                      "folder), with errors and torn responses; the shaded swaps are the warm-up, after which each "
                      "series must grow under 1 % of its level per 100 swaps.", (p,), draw, size=(12, 8.4))


def _panel(ax: Any, doc: Mapping[str, Any], swaps: Sequence[int], panel: tuple[str, tuple[str, ...], str, str],
           colors: Sequence[str]) -> None:
    """One measure: a line per process or folder, titled with its worst growth after warm-up."""
    title, parts, unit, who = panel
    picked = {}
    for name, s in doc["series"].items():
        owner, _, what = name.rpartition("/")
        mine = {"stubs": owner not in ("server", *GROUPS), "server": owner == "server", "": True}[who]
        if what in parts and mine and any(x is not None for x in s["values"]):
            picked[name] = s
    worst = max((v["growth_pct_per_100_swaps"] for v in picked.values()
                 if v["growth_pct_per_100_swaps"] is not None), default=None)
    for i, (name, s) in enumerate(sorted(picked.items())):
        owner, _, what = name.rpartition("/")
        label = what.removesuffix("_bytes") if owner in GROUPS else (
            owner if len(parts) == 1 else f"{owner} {what.removesuffix('_bytes')}")
        ax.plot(swaps, [float("nan") if v is None else v / SHOWN[unit] for v in s["values"]],
                color=colors[i % len(colors)], lw=1.2, marker=".", ms=3, label=label)
    if picked:
        ax.legend(fontsize=6, loc="best")
    else:
        ax.text(0.5, 0.5, textwrap.fill(str(doc.get("gpu_memory") or "not measured"), 40), ha="center",
                va="center", fontsize=7, transform=ax.transAxes)
    ax.set_title(title + ("" if worst is None else f"\nworst growth {worst:+.2f} % per 100 swaps"), fontsize=8)
