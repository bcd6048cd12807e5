"""Running processes by their command line, read from /proc (Linux): a test finds the servers and stubs it
started, and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def pids_where(matches: Callable[[str], bool]) -> list[int]:
    """The ids of the running processes whose command line (arguments joined by NUL) ``matches``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            if matches(cmdline):
                out.append(int(entry.name))
    return out
