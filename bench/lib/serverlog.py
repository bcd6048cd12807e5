"""Reading what the watcher logs in a Triton server's log: each refit's stage breakdown, and when a
version published live was hashed afterwards."""

from __future__ import annotations

import re
import time
from pathlib import Path

#: the watcher's log line for one refit (serving.watch.WatchRecord.summary)
SUMMARY = re.compile(r"refit (?P<version>\S+) -> (?P<outcome>\w+)(?: \([^)]*\))? in (?P<total>\d+) ms from the "
                     r"first event \((?P<stages>[^)]*)\)")


def parse_summaries(log_text: str) -> dict[str, dict[str, float]]:
    """version -> {"total": ms, stage: ms, ...} of every successful refit in a server log. Pure."""
    out: dict[str, dict[str, float]] = {}
    for m in SUMMARY.finditer(log_text):
        if m.group("outcome") != "success":
            continue
        stages = {"total": float(m.group("total"))}
        for part in m.group("stages").split(", "):
            name, _, value = part.rpartition(" ")
            if name and value.replace(".", "", 1).isdigit():  # "hashed after going live" is a note, not a stage
                stages[name] = float(value)
        out[m.group("version")] = stages
    return out


def wait_for_log(path: Path, pattern: re.Pattern[str], timeout: float) -> tuple[float, str] | None:
    """Wait until ``pattern`` appears in the server log: the monotonic time it was seen and the line
    (None: timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(path.read_text(errors="replace"))
        if m:
            return time.monotonic(), m.group(0)
        time.sleep(0.02)
    return None


def hashed_after(path: Path, entry: str, timeout: float) -> float | None:
    """When the watcher finished hashing ``entry`` after it went live (None: it was hashed before, or timed out)."""
    summary = wait_for_log(path, re.compile(r"refit " + re.escape(entry) + r" -> [^\n]* from the first event [^\n]*"),
                           timeout)
    if summary is None or "hashed after going live" not in summary[1]:
        return None
    done = wait_for_log(path, re.compile(re.escape(entry) + r" hashed after it went live"), timeout)
    return None if done is None else done[0]
