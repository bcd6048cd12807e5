"""Can this machine load AOTInductor packages? Asked in a child process, because the loader may crash.

On the GPU machine's torch 2.11.0+cu130, ``torch._inductor.aoti_load_package`` (and the C++
``AOTIModelPackageLoader`` under it) segfaults for every package, even a CPU-only one (docs/aoti-cuda.md;
pytorch/pytorch#166415 reports a crash of a cu130 build alike; no upstream issue names this one).
A segfault inside a Triton stub takes the model instance down without a word, so before the first
package is loaded in a process, :func:`ensure_loadable` loads it in a child Python with the same loader
the engine uses; a child killed by a signal (or failing) makes the ``aoti`` engine unavailable with an
:class:`~serving.errors.EngineUnavailableError` that names the crash and suggests ``engine: inductor``.
The verdict is kept per device for the life of the process.

:data:`LOADERS` lists the loader variants this torch offers; ``bench/aoti_load_probe.py`` tries them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.errors import EngineUnavailableError

#: loader variant -> Python code run as ``python -c CODE PACKAGE DEVICE_INDEX``
LOADERS: dict[str, str] = {
    # what the engine does (serving.engines.aoti.runner): the C++ loader without the Python wrapper
    "package_loader": ("import sys, torch; torch._C._aoti.AOTIModelPackageLoader("
                       "sys.argv[1], 'model', False, 1, int(sys.argv[2]))"),
    "aoti_load_package": "import sys, torch, torch._inductor; torch._inductor.aoti_load_package(sys.argv[1])",
    "run_single_threaded": ("import sys, torch, torch._inductor; "
                            "torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True)"),
}
#: the variant the engine itself uses
ENGINE_LOADER = "package_loader"

_verdicts: dict[str, str] = {}  # device -> "" (loads) or why not
_lock = threading.Lock()


@dataclass(frozen=True)
class ProbeResult:
    """How one child process that loaded a package ended."""

    variant: str
    returncode: int | None  # None: timed out
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def signal(self) -> str | None:
        """The signal that killed the child (``SIGSEGV``), if one did."""
        if self.returncode is not None and self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return None

    def describe(self) -> str:
        if self.ok:
            return f"{self.variant}: loaded ({self.seconds:.1f}s)"
        if self.returncode is None:
            how = "did not finish (timed out)"
        elif self.signal:
            how = f"crashed with {self.signal}"
        else:
            how = f"failed with exit code {self.returncode}"
        tail = self.output.strip().splitlines()[-1:] or [""]
        return f"{self.variant}: the loader {how}" + (f" ({tail[0][:300]})" if tail[0] else "")


def python_executable() -> str:
    """A Python interpreter of this environment (inside a Triton stub ``sys.executable`` may be the stub)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, str(Path(sys.prefix) / "bin" / version), str(Path(sys.prefix) / "bin" / "python3"),
                  shutil.which(version) or "", shutil.which("python3") or ""]
    for c in candidates:
        if c and Path(c).name.startswith("python") and os.access(c, os.X_OK):
            return c
    raise EngineUnavailableError(f"cannot find a Python interpreter to probe the AOTInductor loader (tried "
                                 f"{[c for c in candidates if c]})")


def device_index(device: torch.device) -> int:
    return device.index if device.type != "cpu" and device.index is not None else (0 if device.type == "cuda" else -1)


def run_loader(package: Path, device: torch.device, variant: str, *, code: str | None = None,
               timeout: float = 300.0) -> ProbeResult:
    """Load ``package`` in a child Python with one loader variant; how the child ended."""
    cmd = [python_executable(), "-c", code if code is not None else LOADERS[variant], str(package),
           str(device_index(device))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else ""
        return ProbeResult(variant, None, time.perf_counter() - t0, out[-2000:])
    return ProbeResult(variant, proc.returncode, time.perf_counter() - t0,
                       proc.stdout.decode(errors="replace")[-2000:])


def ensure_loadable(package: Path, device: torch.device, *, code: str | None = None) -> None:
    """Raise :class:`EngineUnavailableError` when loading ``package`` crashes a child process here.

    Asked once per device and process (the first package decides); ``code`` replaces the loader
    (tests fake a crash with it).
    """
    key = str(device)
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is None:
            result = run_loader(package, device, ENGINE_LOADER, code=code)
            verdict = "" if result.ok else result.describe()
            _verdicts[key] = verdict
    if verdict:
        raise EngineUnavailableError(
            f"engine 'aoti' cannot run on this machine ({device}, torch {torch.__version__}): loading a compiled "
            f"package in a child process, {verdict}. Loading it here would take the server down with it. "
            "Use engine 'inductor' (torch.compile, also weight-stripped and cached) instead")


def forget_verdicts() -> None:
    """Drop the kept verdicts (tests)."""
    with _lock:
        _verdicts.clear()


__all__ = ["ENGINE_LOADER", "LOADERS", "ProbeResult", "ensure_loadable", "forget_verdicts", "python_executable",
           "run_loader"]
