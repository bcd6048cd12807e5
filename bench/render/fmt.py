"""Formatting of the generated documents: durations, rates, tables, links to the result files, machines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def secs(s: float | None) -> str:
    """A duration with three significant digits, in µs, ms or s."""
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def ms(v: float | None) -> str:
    return "n/a" if v is None else secs(v / 1e3)


def num(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None or v != v else f"{v:.3g}{unit}"


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not doc.get("command"):
        raise ValueError(f"{path}: a result needs its 'command' (the command line that wrote it)")
    return doc


def link(path: Path, up: str = "../") -> str:
    """A Markdown link to a result file, from a document ``up`` below the repository root (``""``: the README,
    ``"../"``: ``docs/``)."""
    return f"[`{path.name}`]({up}bench/results/{path.name})"


def sources(paths: Iterable[Path], up: str = "../") -> str:
    """One line per JSON: the file and the command that wrote it."""
    return "".join(f"* {link(p, up)}: `{load(p)['command']}`\n" for p in paths)


def machine(doc: Mapping[str, Any]) -> str:
    env = doc.get("machine") or doc.get("environment") or {}
    gpu = env.get("gpu")
    cpus = env.get("cpus")
    torch = env.get("torch")
    return ", ".join(x for x in (gpu, f"{cpus} CPUs" if cpus else None, f"torch {torch}" if torch else None) if x)


def files(pattern: str, results: Path) -> list[Path]:
    return sorted(results.glob(pattern))


def errors(paths: Iterable[Path]) -> str:
    """The failures a run recorded (a size or configuration that did not complete), one line each."""
    lines = []
    for p in paths:
        for e in load(p).get("errors") or []:
            what = e.get("what") or (f"{e['size_gb']} GB" if "size_gb" in e else "run")
            lines.append(f"* {link(p)}, {what}: did not complete: `{str(e.get('error', '')).splitlines()[0][:200]}`\n")
    return "".join(lines)


def to_measure(what: str, *commands: str) -> str:
    run = " and ".join(f"`{c}`" for c in commands)
    return (f"{what}: no results in `bench/results/` yet; {run} {'writes' if len(commands) == 1 else 'write'} "
            f"them.\n")
