"""In-process clients of a :class:`~serving.refit.RefitCoordinator`: requests sent from a thread while
a benchmark refits, as a server's requests would arrive."""

from __future__ import annotations

import threading
import time

import torch

from serving.refit import RefitCoordinator


class IntervalClient:
    """Sends one request every ``interval_s`` from a thread; records when each started and how long it took."""

    def __init__(self, coord: RefitCoordinator, x: torch.Tensor, interval_s: float) -> None:
        self.coord, self.x, self.interval_s = coord, x, interval_s
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-client", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                y = self.coord.infer([self.x])[0]
                y.float().sum().item()  # wait for the answer, as a server returning it would
            except Exception:
                self.errors += 1
            self.samples.append((t0, time.perf_counter() - t0))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> IntervalClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def during(self, windows: list[tuple[float, float]]) -> list[float]:
        """Latencies of the requests that overlapped one of ``windows``."""
        return [lat for t0, lat in self.samples if any(a <= t0 + lat and t0 <= b for a, b in windows)]

    def outside(self, windows: list[tuple[float, float]]) -> list[float]:
        """Latencies of the requests that overlapped none of ``windows``."""
        return [lat for t0, lat in self.samples if not any(a <= t0 + lat and t0 <= b for a, b in windows)]


class BackToBackClient:
    """Sends requests back to back from a thread; keeps the last responses and when each returned."""

    def __init__(self, coord: RefitCoordinator, x: torch.Tensor, keep: int = 64) -> None:
        self.coord, self.x, self.keep = coord, x, keep
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.responses: list[tuple[float, torch.Tensor]] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.run, name="bench-client", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = self.coord.infer([self.x])[0].detach().cpu()
            except Exception as e:  # reported, not raised
                self.errors.append(repr(e))
                return
            with self.lock:
                self.responses.append((time.monotonic(), out))
                del self.responses[:-self.keep]

    def first_matching(self, since: float, ref: torch.Tensor, atol: float) -> float | None:
        """When the first kept response returned after ``since`` that equals ``ref`` (None: none yet)."""
        with self.lock:
            for t, out in self.responses:
                if t >= since and torch.allclose(out, ref, atol=atol, rtol=0):
                    return t
        return None
