"""What every benchmark records beside its figures: the command that repeats the run, and its JSON file.

The command is written as it was given, with the output folder of ``bench/gpu_run.sh`` (``$OUT``)
in place of the machine's path, so a result names no machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def command_args(argv: list[str]) -> list[str]:
    """``argv`` with the output folder of ``bench/gpu_run.sh`` written as ``$OUT`` (no machine's path)."""
    out = os.environ.get("OUT")
    return [a.replace(out, "$OUT") for a in argv] if out else list(argv)


def command(entry: str, argv: list[str]) -> str:
    """The command line that repeats a run (``entry``: ``python3 -m bench.x`` or ``python bench/x.py``)."""
    return " ".join([entry, *command_args(argv)])


def dumps(doc: Any) -> str:
    """``doc`` as JSON indented by two spaces, each list of plain values on one line (a timeline of
    thousands of requests stays a few lines long); values JSON does not know are written with ``str``."""
    return _dumps(doc, 0)


def _dumps(v: Any, depth: int) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(v, dict) and v:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(x, depth + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, (list, tuple)) and v:
        if all(not isinstance(x, (dict, list, tuple)) for x in v):
            return json.dumps(list(v), default=str)
        return "[\n" + ",\n".join(inner + _dumps(x, depth + 1) for x in v) + "\n" + pad + "]"
    return json.dumps(v, default=str)


def write_json(doc: dict[str, Any], path: Path | None) -> None:
    """Print a result and, given a path, write it there too."""
    text = dumps(doc)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
