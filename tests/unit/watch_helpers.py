"""Shared helpers of the weights-folder tests: a coordinator + watcher rig on the eager engine, publishing
helpers that write real files, and bounded waits (poll a condition with a deadline, never sleep-and-hope)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from serving.engines import build_engine
from serving.examples import TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.metrics import prometheus_metrics
from serving.publish import staging
from serving.refit import RefitCoordinator
from serving.watch import WeightsWatcher
from serving.weights import CheckpointPolicy
from serving.weights.random_state import random_state_dict

SPEC = example_build_spec(TRANSFORMER)
X = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
DEBOUNCE = 0.05
TIMEOUT = 20.0


@functools.lru_cache(maxsize=256)
def _state(seed: int) -> dict[str, torch.Tensor]:
    return random_state_dict(build_module(TRANSFORMER), seed)


def state(seed: int) -> dict[str, torch.Tensor]:
    """A valid random checkpoint for the example transformer (fresh dict, shared tensors)."""
    return dict(_state(seed))


@functools.lru_cache(maxsize=1)
def _module() -> torch.nn.Module:
    return build_module(TRANSFORMER)


def forward(tensors: Mapping[str, torch.Tensor], x: torch.Tensor = X) -> torch.Tensor:
    """The example transformer's output with these weights (an eager module of its own)."""
    with torch.inference_mode():
        out = torch.func.functional_call(_module(), dict(tensors), (x,))
    assert isinstance(out, torch.Tensor)
    return out


@functools.lru_cache(maxsize=256)
def expected(seed: int) -> torch.Tensor:
    return forward(_state(seed))


def wait_for(cond: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.005)


class Clock:
    """Strictly increasing mtimes (the filesystem may give two quick writes the same one)."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last = max(time.time_ns(), self.last + 1_000_000)
        return self.last


def write_atomic(path: Path, data: bytes | Mapping[str, torch.Tensor], *, mtime_ns: int | None = None) -> Path:
    """Write to a hidden temp name in the same folder, then rename, with a chosen mtime or bytes that need not
    be a valid checkpoint (valid versions are published with :mod:`serving.publish`, as in :meth:`Rig.publish`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        save_file(dict(data), str(tmp))
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.rename(tmp, path)
    # publish time is arrival (ctime), stamped with the kernel's coarse clock (a few ms) unless fine-grained
    # times were asked for: let it tick, so entries written one after the other arrive in that order
    time.sleep(0.01)
    return path


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(dict(tensors))


def refits(registry: CollectorRegistry, outcome: str, reason: str | None = None) -> float:
    """hotswap_refits_total summed over the matching labels."""
    total = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if (s.name == "hotswap_refits_total" and s.labels.get("outcome") == outcome
                    and (reason is None or s.labels.get("reason") == reason)):
                total += s.value
    return total


def snapshot(path: Path) -> list[tuple[str, int, int, int, str]]:
    """What a user's file or directory is: (relative path, mode, size, mtime_ns, sha256) of every entry."""
    import hashlib

    rows = []
    entries = [path] if not path.is_dir() or path.is_symlink() else [path, *sorted(path.rglob("*"))]
    for p in entries:
        st = os.lstat(p)
        digest = ""
        if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            digest = os.readlink(p)
        rows.append((str(p.relative_to(path.parent)), st.st_mode, st.st_size, st.st_mtime_ns, digest))
    return rows


def watcher_errors(registry: CollectorRegistry) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == "hotswap_watcher_errors_total")


class Rig:
    """Eager engine + coordinator + watcher on ``folder``, metrics in a fresh registry."""

    def __init__(self, folder: Path, *, strategy: str = "double_buffer", mode: str = "inotify",
                 policy: CheckpointPolicy | None = None, fast_path: bool | None = None,
                 **watcher_kwargs: object) -> None:
        """``fast_path``: the coordinator's (None: its default for ``strategy``)."""
        self.folder = folder
        self.registry = CollectorRegistry()
        self.metrics = prometheus_metrics(self.registry)
        self.engine = build_engine("eager", SPEC)
        # the served model gives the coordinator and the watcher the same policy
        self.coord = RefitCoordinator(self.engine, strategy=strategy, metrics=self.metrics, checkpoint_policy=policy,
                                      fast_path=fast_path)
        kwargs: dict[str, object] = {"debounce_s": DEBOUNCE, "poll_interval_s": 0.05, "mode": mode,
                                     "checkpoint_policy": policy}
        kwargs.update(watcher_kwargs)
        self.watcher = WeightsWatcher(folder, self.coord, **kwargs)  # type: ignore[arg-type]
        self.clock = Clock()
        self.started = False

    def start(self) -> Rig:
        self.watcher.start()
        self.started = True
        return self

    def publish(self, name: str, seed_or_tensors: int | Mapping[str, torch.Tensor]) -> Path:
        """Publish a checkpoint as ``name`` with :func:`serving.publish.staging`; the clock follows its
        publish time, so later :meth:`Clock.next` stamps are newer."""
        tensors = state(seed_or_tensors) if isinstance(seed_or_tensors, int) else seed_or_tensors
        with staging(self.folder, name) as staged:
            save_file(dict(tensors), str(staged.temp))
            staged.seal()
            self.clock.last = max(self.clock.last, os.stat(staged.temp).st_mtime_ns)
        return staged.final

    def output(self) -> torch.Tensor:
        return self.coord.infer([X])[0]

    def wait_live(self, version: str, timeout: float = TIMEOUT) -> None:
        wait_for(lambda: self.coord.live_version == version,
                 f"live version {version!r} (live: {self.coord.live_version!r}, rejected: "
                 f"{dict(self.watcher.rejected)})", timeout)

    def wait_rejected(self, path: Path, timeout: float = TIMEOUT) -> str:
        wait_for(lambda: str(path) in self.watcher.rejected, f"{path} rejected", timeout)
        return self.watcher.rejected[str(path)]

    def idle(self, timeout: float = TIMEOUT) -> None:
        assert self.watcher.wait_idle(timeout), f"watcher not idle: {self.watcher.status()}"

    def close(self) -> None:
        self.watcher.stop(timeout=10)
        self.coord.close()
