"""What a long run watches for leaks: per process (Linux ``/proc``) resident memory, open file descriptors,
threads, locked and pinned memory, memory mapped from the NVIDIA driver; per GPU process its device memory
(``nvidia-smi``); and how many files a folder holds.

Every probe returns a plain number, or None when it cannot be measured here (the process is gone, no
``nvidia-smi``); :func:`why_not_gpu` says why GPU figures are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: the Python backend's stub: one process per model instance, a child of tritonserver
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Proc:
    """A process to watch: its pid and a stable name (a stub's model instance, or ``server``)."""

    pid: int
    name: str


def status_fields(pid: int) -> dict[str, int]:
    """The numeric fields of ``/proc/PID/status`` in bytes (``kB`` values) or as counts; {} if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return parse_status(text)


def parse_status(text: str) -> dict[str, int]:
    """``/proc/PID/status`` -> {field: value}, ``kB`` values in bytes; fields that are not one number are
    left out. Pure."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
        elif len(parts) == 1 and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def deleted_held(pid: int) -> tuple[int | None, int | None]:
    """Files ``pid`` holds after they were deleted: (open descriptors to them, bytes of its mappings of them).
    A deleted checkpoint still open or mapped keeps its disk space (and, mapped, its page cache) in use."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None, None
    held = 0
    for fd in fds:
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)")
        except OSError:
            continue
    return held, parse_maps_deleted_bytes(maps)


def parse_maps_deleted_bytes(text: str) -> int:
    """Total size of the mappings in a ``/proc/PID/maps`` text of files that were deleted (not shared memory
    segments, which the kernel also names so). Pure."""
    total = 0
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(" (deleted)") and not parts[5].startswith(("/dev/shm/", "/SYSV",
                                                                                           "/memfd:")):
            lo, _, hi = parts[0].partition("-")
            total += int(hi, 16) - int(lo, 16)
    return total


def nvidia_mapped_bytes(pid: int) -> int | None:
    """Bytes of ``pid``'s address space mapped from the NVIDIA driver's device files (``/dev/nvidia*``):
    where CUDA maps pinned host memory (``cudaHostAlloc``) and its own driver buffers."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return parse_maps_device_bytes(text, "/dev/nvidia")


def parse_maps_device_bytes(text: str, prefix: str) -> int:
    """Total size of the mappings in a ``/proc/PID/maps`` text whose path starts with ``prefix``. Pure."""
    total = 0
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(prefix):
            lo, _, hi = parts[0].partition("-")
            total += int(hi, 16) - int(lo, 16)
    return total


def children(pid: int) -> Iterator[int]:
    """The direct children of ``pid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            yield int(entry.name)


def stubs(server_pid: int) -> list[Proc]:
    """The Python-backend stubs of a tritonserver, each named by its model instance (the stub's 8th
    argument, e.g. ``tiny_cnn_0_1``), sorted by name."""
    found = []
    for pid in children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode(errors="replace")) == STUB and len(argv) > 8:
            found.append(Proc(pid, argv[8].decode(errors="replace")))
    return sorted(found, key=lambda p: p.name)


def process_sample(pid: int, *, gpu: bool) -> dict[str, int | None]:
    """One process: resident bytes (all, and anonymous: the heap, not file pages mapped for reading), open fds,
    threads, locked and pinned bytes (``VmLck``, ``VmPin``), deleted files it still holds open or mapped and,
    with ``gpu``, the bytes it maps from the NVIDIA driver."""
    st = status_fields(pid)
    deleted_fds, deleted_mapped = deleted_held(pid)
    out: dict[str, int | None] = {"rss_bytes": st.get("VmRSS"), "rss_anon_bytes": st.get("RssAnon"),
                                  "fds": open_fds(pid), "threads": st.get("Threads"),
                                  "vm_lck_bytes": st.get("VmLck"), "vm_pin_bytes": st.get("VmPin"),
                                  "deleted_fds": deleted_fds, "deleted_mapped_bytes": deleted_mapped}
    if gpu:
        out["nvidia_mapped_bytes"] = nvidia_mapped_bytes(pid)
    return out


def why_not_gpu() -> str | None:
    """None when ``nvidia-smi`` can report GPU memory here, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "no GPU here (no nvidia-smi)"
    return None


def _smi(*query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_used_bytes(index: int = 0) -> int | None:
    """Memory in use on GPU ``index``, all processes (``nvidia-smi --query-gpu=memory.used``)."""
    try:
        rows = _smi("--query-gpu=memory.used", "-i", str(index))
    except (OSError, subprocess.SubprocessError):
        return None
    return int(float(rows[0][0]) * 2**20) if rows and rows[0] and rows[0][0] else None


def gpu_process_bytes() -> dict[int, int]:
    """pid -> GPU memory of each compute process (``nvidia-smi --query-compute-apps``); {} where the driver
    does not say (a container's pids may not be the host's)."""
    try:
        rows = _smi("--query-compute-apps=pid,used_memory")
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for row in rows:
        if len(row) == 2 and row[0].isdigit() and row[1].replace(".", "", 1).isdigit():
            out[int(row[0])] = int(float(row[1]) * 2**20)
    return out


def count_paths(folder: Path, top: Callable[[str], bool] = lambda name: True) -> int:
    """Files and folders under ``folder``, at any depth (an empty folder left behind counts too), below the
    top-level entries whose name passes ``top``. 0 for a missing folder."""
    try:
        tops = [e for e in os.scandir(folder) if top(e.name)]
    except OSError:
        return 0
    total = len(tops)
    for entry in tops:
        if entry.is_dir(follow_symlinks=False):
            for _, dirs, files in os.walk(entry.path):
                total += len(dirs) + len(files)
    return total
