"""Render the generated blocks of the README and docs/benchmarks.md, and their pictures, from
``bench/results/*.json`` and the tables of the code (settings, refit stages).

    python -m bench.render_readme                  # rewrite what is out of date
    python -m bench.render_readme --check          # change nothing; exit 1, naming what is out of date
    python -m bench.render_readme --png DIR        # also draw every picture as PNG into DIR, to look at

A generated block is the text between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``
(:mod:`bench.render.blocks`); :data:`DOCUMENTS` maps each document to the generator of each of its blocks.
The measurement tables are in docs/benchmarks.md (:mod:`bench.render.tables`: every JSON in
``bench/results/`` appears in one, with the command that wrote it), the headline figures in the README
(:mod:`bench.render.glance`), the pictures in ``docs/figures/`` (:mod:`bench.render.figures`, SVG drawn the
same way on every run). Everything else in the documents is written by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench.render.blocks import block_names, read_block, render, replace_block, stale_blocks  # noqa: F401
from bench.render.figures import FIGURES, Picture, pictures
from bench.render.glance import glance
from bench.render.tables import RESULTS, measured

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
#: pictures the README shows beside its headlines (the others are in docs/benchmarks.md)
README_PICTURES = ("publish-by-size", "timeline-serve-swap-timeline-cpu2")


def settings() -> str:
    """The configuration table: serving.settings.SETTINGS."""
    from serving.settings import markdown_table

    return markdown_table()


def stages() -> str:
    """The refit stages table: serving.metrics.STAGES."""
    from serving.metrics import STAGES

    return "\n".join(["| stage | what it times |", "| --- | --- |",
                      *(f"| `{name}` | {doc} |" for name, doc in STAGES.items())])


def readme_glance(results: Path = RESULTS) -> str:
    """The README's headlines and its pictures."""
    shown = {p.name: p for p in pictures(results)}
    missing = [n for n in README_PICTURES if n not in shown]
    if missing:
        raise ValueError(f"the README shows the pictures {', '.join(missing)}, which no result file makes")
    return glance(results) + "".join("\n" + shown[n].markdown("", "docs/figures") for n in README_PICTURES)


def figures_block(results: Path = RESULTS) -> str:
    """docs/benchmarks.md's pictures, each with its caption."""
    return "\n".join(p.markdown("../", "figures") for p in pictures(results))


#: document -> block name -> generator
DOCUMENTS: dict[Path, dict[str, Callable[[], str]]] = {
    README: {"glance": readme_glance, "settings": settings, "stages": stages},
    BENCHMARKS: {"figures": figures_block, "measured": measured},
}


def stale_pictures(drawn: list[Picture], folder: Path = FIGURES) -> list[str]:
    """Pictures whose file differs from what is drawn now, or is missing, and SVG files no picture makes."""
    names = {p.name for p in drawn}
    stale = [f"{p.name}.svg" for p in drawn
             if not (folder / f"{p.name}.svg").exists() or (folder / f"{p.name}.svg").read_bytes() != p.svg()]
    return stale + sorted(f.name for f in folder.glob("*.svg") if f.stem not in names)


def write_pictures(drawn: list[Picture], folder: Path = FIGURES) -> list[str]:
    """Write the pictures that changed, remove the SVG files no picture makes; what changed."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = stale_pictures(drawn, folder)
    for p in drawn:
        if f"{p.name}.svg" in changed:
            (folder / f"{p.name}.svg").write_bytes(p.svg())
    for f in folder.glob("*.svg"):
        if f.stem not in {p.name for p in drawn}:
            f.unlink()
    return changed


def run(documents: dict[Path, dict[str, Callable[[], str]]], folder: Path, drawn: list[Picture],
        check: bool) -> list[str]:
    """What is out of date among ``documents``' blocks and the pictures in ``folder``; unless ``check``,
    rewritten."""
    out_of_date = [f"{doc.name}: {', '.join(names)}" for doc, generators in documents.items()
                   if (names := stale_blocks(doc.read_text(), generators))]
    stale = stale_pictures(drawn, folder) if check else write_pictures(drawn, folder)
    out_of_date += [f"{folder.name}: {', '.join(stale)}"] if stale else []
    if not check:
        for doc, generators in documents.items():
            text = doc.read_text()
            if stale_blocks(text, generators):
                doc.write_text(render(text, generators))
    return out_of_date


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block or picture is out of date")
    ap.add_argument("--png", type=Path, metavar="DIR", help="also write every picture as PNG into DIR")
    args = ap.parse_args(argv)
    drawn = pictures(RESULTS)
    out_of_date = run(DOCUMENTS, FIGURES, drawn, args.check)
    for line in out_of_date:
        print(f"out of date: {line}; run python -m bench.render_readme" if args.check else f"rewrote {line}",
              file=sys.stderr if args.check else sys.stdout)
    if args.png:
        args.png.mkdir(parents=True, exist_ok=True)
        for p in drawn:
            (args.png / f"{p.name}.png").write_bytes(p.png())
    return 1 if args.check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main())
