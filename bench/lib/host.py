"""What a benchmark records about the machine it ran on (one shape for every benchmark), where it puts
its checkpoints, and how much memory the server under test holds."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


def commit() -> str | None:
    """The commit measured: ``HOTSWAP_COMMIT`` (a copy without git), else the checkout's."""
    given = os.environ.get("HOTSWAP_COMMIT")
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine a result is about: Python, platform, CPUs, torch, the GPU of a ``cuda`` device, host
    memory, the commit and the date. Every benchmark records this dict (as ``machine`` or ``environment``)."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "gpu": None,
                           "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=p.total_memory / GB)
    with contextlib.suppress(OSError, ValueError):
        env["host_memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return env


def pick_dir(requested: str | None, need_bytes: float) -> Path:
    """Where checkpoints go: ``requested``, else /dev/shm when it has room, else the temp folder."""
    if requested:
        return Path(requested)
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(candidate).free > need_bytes * 1.1:
                return Path(candidate)
    return Path(tempfile.gettempdir())


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


class MemorySampler:
    """Peak GPU memory in use (``nvidia-smi``), or peak resident memory of a process tree on CPU, sampled
    on a thread while the ``with`` block runs."""

    def __init__(self, pid: int | None, gpu: bool, interval_s: float = 0.05) -> None:
        self.pid, self.gpu, self.interval_s = pid, gpu, interval_s
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> int:
        if self.gpu:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            return int(float(out.split()[0]) * 2**20) if out.strip() else 0
        return tree_rss(self.pid) if self.pid else 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak_bytes = max(self.peak_bytes, self.sample())
            except (OSError, subprocess.SubprocessError, ValueError):
                continue

    def __enter__(self) -> MemorySampler:
        self.baseline_bytes = self.peak_bytes = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
