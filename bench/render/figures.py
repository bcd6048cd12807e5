"""The pictures of docs/benchmarks.md (and the README), drawn with matplotlib from ``bench/results/*.json``.

Each :class:`Picture` knows the JSON files it is drawn from, draws itself as SVG, and writes its caption
(the JSON files and the commands that wrote them). The SVG is reproducible: matplotlib is pinned
(``pyproject.toml``), the IDs are salted with a fixed string, the text is drawn as paths in the bundled
DejaVu Sans, and no date is written; the renderer's check redraws every picture and compares the bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.render.fmt import files, link, load, machine, secs
from bench.render.glance import GPU_PUBLISH
from bench.render.soak import soak_pictures
from bench.render.tables import loader_rows, size

#: where the pictures go, beside the documents that show them
FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"

RC = {"svg.hashsalt": "hotswap", "svg.fonttype": "path", "font.family": "DejaVu Sans", "font.size": 10,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "axes.axisbelow": True, "legend.frameon": False}
TRANSFER_LABELS = {"pinned": "pinned: a ring of pinned buffers", "kvikio": "kvikio: KvikIO's threads into the tensors",
                   "auto": "auto: KvikIO where it reads, else the pinned ring",
                   "registered": "registered (retired): DMA from the page cache",
                   "pinned copy limit": "pinned host → device copy (the limit)"}
HOTSWAP, RELOAD, OTHER = ("#1f5fa8", "#7fa7d9"), ("#d1641d", "#efaa7a"), ("#4d9a4d", "#98c998", "#7a5aa6")


@dataclass(frozen=True)
class Picture:
    """One picture: its file name (without ``.svg``), what it shows, its JSON files and how to draw it."""

    name: str
    alt: str
    what: str
    sources: tuple[Path, ...]
    draw: Callable[[Any], None]
    #: inches
    size: tuple[float, float] = (9, 4.8)

    def svg(self) -> bytes:
        """The picture as SVG, byte for byte the same on every run with the same JSON."""
        return self._save("svg", {"Date": None, "Creator": None})

    def png(self) -> bytes:
        """The picture as PNG (to look at it; the documents show the SVG)."""
        return self._save("png", {"Software": None})

    def _save(self, fmt: str, metadata: dict[str, Any]) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        with matplotlib.rc_context(RC):
            fig = Figure(figsize=self.size, layout="constrained")
            self.draw(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, metadata=metadata, dpi=110)
        return buf.getvalue()

    def markdown(self, up: str, figures: str) -> str:
        """The image and its caption, for a document ``up`` below the repository root whose pictures are in
        ``figures`` (relative to the document)."""
        made = "; ".join(f"{link(p, up)} (`{load(p)['command']}`)" for p in self.sources)
        return (f"![{self.alt}]({figures}/{self.name}.svg)\n\n"
                f"*{self.what} From {made}; drawn by `python -m bench.render_readme`.*\n")


def _median(v: float | Mapping[str, Any] | None) -> float | None:
    return v.get("median") if isinstance(v, Mapping) else v


def _bar_labels(ax: Any, bars: Any, values: Sequence[float | None], fmt: Callable[[float], str]) -> None:
    for bar, v in zip(bars, values, strict=True):
        if v is not None:
            ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)


def log_axis(ax: Any, which: str, fmt: Callable[[float], str]) -> None:
    """A log scale whose ticks read as plain values (``fmt``), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------- rename -> first response by size


def publish_by_size(paths: Sequence[Path]) -> Iterator[Picture]:
    """Hotswap beside Triton's own reload, by model size: the given gpu-publish runs with a reload baseline."""
    runs = [(p, load(p)) for p in paths]
    runs = [(p, d) for p, d in runs if any(s.get("baseline") and (s.get("hotswap") or {}).get("double_buffer")
                                           for s in d["sizes"])]
    if not runs:
        return

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        sizes = sorted({round(s["model_bytes"] / 1e9, 2) for _, d in runs for s in d["sizes"] if s.get("baseline")})
        series: list[tuple[str, str, list[float | None]]] = []
        for i, (p, d) in enumerate(runs):
            by = {round(s["model_bytes"] / 1e9, 2): s for s in d["sizes"] if s.get("baseline")}
            hot = [_median(by[g]["hotswap"]["double_buffer"]["publish_to_first_response_s"]) if g in by else None
                   for g in sizes]
            base = [_median(by[g]["baseline"]["publish_to_first_response_s"]) if g in by else None for g in sizes]
            series.append((f"hotswap ({p.name})", HOTSWAP[i % 2], hot))
            series.append((f"Triton's own reload ({p.name})", RELOAD[i % 2], base))
        series.sort(key=lambda s: not s[0].startswith("hotswap"))
        width = 0.8 / len(series)
        for k, (label, color, values) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(sizes))]
            bars = ax.bar(xs, [v or 0 for v in values], width, label=label, color=color)
            _bar_labels(ax, bars, values, secs)
        log_axis(ax, "y", secs)
        ax.set_xticks(range(len(sizes)), [f"{g:g} GB" for g in sizes])
        ax.set_xlabel("model size (float32 weights)")
        ax.set_ylabel("rename → first response (log scale)")
        ax.set_title(f"A new version live through Triton, under load ({machine(runs[0][1])})", fontsize=10)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)

    yield Picture("publish-by-size", "rename to first response by model size, hotswap beside Triton's reload",
                  "Rename → first response with the new weights on a `KIND_GPU` instance while clients send "
                  "requests, by model size (median of the swaps; log scale): hotswap's refit in place beside "
                  "Triton's own reload of the same versions (a new version directory and the repository load API).",
                  tuple(p for p, _ in runs), draw)


# ---------------------------------------------------------------- latency over time through swaps


def _timelines(paths: Sequence[Path]) -> Iterator[tuple[Path, str, str, Mapping[str, Any], Mapping[str, Any]]]:
    """(file, picture name, label, run, timeline) of every run that recorded a per-request timeline."""
    for p in paths:
        doc = load(p)
        if "timeline" in doc:
            yield p, f"timeline-{p.stem}", f"`{doc['model']}`, {doc['clients']} clients", doc, doc["timeline"]
        # a gpu-publish run: the largest size, its first model (one picture per file)
        runs = [(size, strategy, r) for size in doc.get("sizes") or []
                for strategy, r in (size.get("hotswap") or {}).items() if isinstance(r, dict) and "timeline" in r]
        if runs:
            size, strategy, r = max(runs, key=lambda x: x[0]["model_bytes"])
            label = f"{size['model_bytes'] / 1e9:.2f} GB, {strategy}"
            name = f"timeline-{p.stem}-{size['size_gb']:g}gb-{strategy.replace(', ', '-')}"
            yield p, name, label, r, r["timeline"]


def binned(start_s: Sequence[float], latency_ms: Sequence[float], bins: int) -> tuple[list[float], list[float],
                                                                                     list[float]]:
    """Request latencies in ``bins`` equal time bins: (bin centre, median, max) of each bin with requests. Pure."""
    if not start_s:
        return [], [], []
    end = max(start_s) or 1.0
    groups: dict[int, list[float]] = {}
    for t, v in zip(start_s, latency_ms, strict=True):
        groups.setdefault(min(bins - 1, int(t / end * bins)), []).append(v)
    centres, p50, top = [], [], []
    for b in sorted(groups):
        values = sorted(groups[b])
        centres.append((b + 0.5) * end / bins)
        p50.append(values[len(values) // 2])
        top.append(values[-1])
    return centres, p50, top


def swap_timelines(paths: Sequence[Path]) -> Iterator[Picture]:
    """Request latency over time through a run of swaps, the swaps marked."""
    for p, name, label, run, tl in _timelines(paths):
        def draw(fig: Any, run: Mapping[str, Any] = run, tl: Mapping[str, Any] = tl, label: str = label,
                 p: Path = p) -> None:
            ax = fig.add_subplot()
            req = tl["requests"]
            x, p50, top = binned(req["start_s"], req["latency_ms"], 300)
            for i, (a, b) in enumerate(tl["swaps"]):
                ax.axvspan(a, b, color=RELOAD[1], alpha=0.6, lw=0, label="a swap: publish → live" if i == 0 else None)
            ax.plot(x, top, color=HOTSWAP[1], lw=1, label="slowest request in the bin")
            ax.plot(x, p50, color=HOTSWAP[0], lw=1.5, label="median request in the bin")
            log_axis(ax, "y", lambda v: f"{v:g} ms")
            ax.set_xlabel("seconds since the first request")
            ax.set_ylabel("request latency (log scale)")
            ax.set_title(f"{label.replace('`', '')}: {run['requests']} requests, {len(tl['swaps'])} swaps, "
                         f"{run['errors']} errors, {run['torn']} torn ({machine(load(p))})", fontsize=10)
            ax.legend(loc="upper right", fontsize=8)

        yield Picture(name, f"request latency over time through {len(tl['swaps'])} swaps",
                      f"Request latency over time on a real Triton while new versions are published ({label}): the "
                      f"median and the slowest request of each of 300 time bins; each shaded span is one swap, from "
                      f"publish to live on every instance.", (p,), draw)


# ---------------------------------------------------------------- GB/s by weight loader


def transfer_loaders(paths: Sequence[Path]) -> Iterator[Picture]:
    """The transfers of one gpu-refit run side by side (``--transfers``: the pinned ring, KvikIO; the retired
    registered pages in an older run), by checkpoint size."""
    for p in paths:
        doc = load(p)
        runs = [r for r in doc.get("runs", []) if r.get("strategy") == "double_buffer"]
        transfers = sorted({r.get("transfer", "pinned") for r in runs})
        if len(transfers) < 2:
            continue

        def draw(fig: Any, runs: list[dict[str, Any]] = runs, transfers: list[str] = transfers,
                 doc: Mapping[str, Any] = doc) -> None:
            ax = fig.add_subplot()
            sizes = sorted({r["bytes"] for r in runs})
            bars_of = [*transfers, "pinned copy limit"]
            width = 0.8 / len(bars_of)
            for k, what in enumerate(bars_of):
                if what == "pinned copy limit":
                    values = [next((r.get("pinned_gbps") for r in runs if r["bytes"] == b), None) for b in sizes]
                else:
                    values = [next((r["effective_gbps"] for r in runs if r["bytes"] == b and
                                    r.get("transfer", "pinned") == what), None) for b in sizes]
                xs = [i + (k - (len(bars_of) - 1) / 2) * width for i in range(len(sizes))]
                color = "#b0b0b0" if what == "pinned copy limit" else OTHER[k % len(OTHER)]
                bars = ax.bar(xs, [v or 0 for v in values], width, label=TRANSFER_LABELS.get(what, what), color=color)
                _bar_labels(ax, bars, values, lambda v: f"{v:.1f}")
            if doc.get("read_only_gbps"):
                ax.axhline(doc["read_only_gbps"], color="#555555", lw=1, ls="--",
                           label=f"the reader threads alone, page cache → pinned memory ({doc['read_only_gbps']:.1f})")
            ax.set_xticks(range(len(sizes)), [f"{b / 1e9:.2f} GB" for b in sizes])
            ax.set_xlabel("checkpoint size")
            ax.set_ylabel("file → first response (GB/s)")
            ax.set_title(f"Weight transfers side by side ({machine(doc)})", fontsize=10)
            fig.legend(loc="outside lower center", ncols=2, fontsize=8)

        retired = (" `registered` (DMA from the page cache, registered with CUDA) measured slower, with stalls, and "
                   "was retired." if "registered" in transfers else "")
        yield Picture(f"loaders-{p.stem}", "GB/s by weight transfer and checkpoint size",
                      "Checkpoint bytes per second from the rename to the first response served with them, by the "
                      "way the bytes reach the GPU (`weights_transfer`), beside the pinned host → device copy rate "
                      f"of the same run.{retired}", (p,), draw)


def loader_comparison(paths: Sequence[Path]) -> Iterator[Picture]:
    """The weight loaders of one ``bench/loaders.py`` run side by side: GB/s and what serving paid for it."""
    for p in paths:
        doc = load(p)
        rows = loader_rows(p, doc)
        if not rows:
            continue

        def draw(fig: Any, rows: list[dict[str, Any]] = rows, doc: Mapping[str, Any] = doc) -> None:
            rate, cost = fig.subplots(1, 2, sharey=True)
            labels = [", ".join([r["name"], *([f"{r['threads']} threads"] if r["threads"] else []),
                                 *([size(r["task_bytes"])] if r["task_bytes"] else [])]) for r in rows]
            ys = list(range(len(rows)))[::-1]
            bars = rate.barh(ys, [r["gbps"] for r in rows], color=HOTSWAP[0])
            for bar, r in zip(bars, rows, strict=True):
                rate.annotate(f"{r['gbps']:.1f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                              xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            rate.set_yticks(ys, labels, fontsize=8)
            rate.set_xlabel("GB/s")
            rate.set_title("rate, checkpoint → device memory", fontsize=9)
            h = 0.4
            cost.barh([y + h / 2 for y in ys], [r["p99_steady_ms"] or float("nan") for r in rows], h, color=OTHER[1],
                      label="requests p99, steady")
            during = cost.barh([y - h / 2 for y in ys], [r["p99_during_ms"] or float("nan") for r in rows], h,
                               color=RELOAD[0], label="requests p99, while loading")
            for bar, r in zip(during, rows, strict=True):
                if r["p99_during_ms"] and r["p99_steady_ms"]:
                    ratio = r["p99_during_ms"] / r["p99_steady_ms"]
                    cost.annotate(f"{ratio:.1f}x" if ratio < 100 else f"{ratio:,.0f}x",
                                  (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                                  textcoords="offset points", va="center", fontsize=7)
            log_axis(cost, "x", lambda v: secs(v / 1e3))  # a stalled loader is 10^5 times a steady request
            from matplotlib.ticker import LogLocator

            cost.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))  # decades only: six of them fit
            cost.set_xlabel("request latency, p99 (log scale)")
            cost.set_title("requests served beside it", fontsize=9)
            fig.legend(loc="outside lower center", ncols=2, fontsize=8)
            fig.suptitle(f"Weight loaders side by side ({machine(doc)})", fontsize=10)

        yield Picture(p.stem, "GB/s by weight loader",
                      "Each weight loader's rate reading a checkpoint into device memory (left) and the p99 latency "
                      "of requests served beside it, steady and while it loads, with their ratio (right, log "
                      "scale).", (p,), draw)


def pictures(results: Path) -> list[Picture]:
    """Every picture the result files in ``results`` make, in the order the documents show them."""
    headline = [p for p in files("gpu-publish-*.json", results) if p.name == GPU_PUBLISH]
    return [*publish_by_size(headline or files("gpu-publish-*.json", results)),
            *swap_timelines(files("serve-swap-*.json", results) + files("gpu-publish-*.json", results)),
            *transfer_loaders(files("gpu-refit-*.json", results)),
            *loader_comparison(files("loaders-*.json", results)),
            *soak_pictures(files("soak-*.json", results))]
