"""Zero-downtime load test: clients send requests to a Triton model while weight versions are swapped.

Every response is compared with the outputs of every published version: it must match exactly
one of them (within ``atol``), or it was computed from a mix of weights (a torn read).
Used by the swap benchmarks (``bench/serve_swap.py``, ``gpu_serve_swap.py``, ``gpu_publish.py``,
``triton_reload.py``) and the zero-downtime integration test.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.lib.stats import percentile
from serving.triton.version_output import VERSION_OUTPUT, VERSION_UTF8_OUTPUT, decode_utf8


@dataclass(frozen=True)
class SwapLoadResult:
    requests: int
    errors: int
    torn: int
    swaps: int
    steady_p50_ms: float
    steady_p99_ms: float
    swap_p50_ms: float
    swap_p99_ms: float
    requests_during_swaps: int
    versions_seen: dict[str, int] = field(default_factory=dict)
    error_samples: tuple[str, ...] = ()
    #: every answered request: (start, latency), monotonic seconds (not in :meth:`to_json`)
    samples: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    #: every swap: (publish started, live), monotonic seconds (not in :meth:`to_json`)
    swap_spans: tuple[tuple[float, float], ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, object]:
        """The counts and percentiles (without the per-request timeline)."""
        out = asdict(self)
        del out["samples"], out["swap_spans"]
        return out

    def timeline(self) -> dict[str, object]:
        """The per-request timeline: :func:`timeline` of :attr:`samples` and :attr:`swap_spans`."""
        return timeline(self.samples, self.swap_spans)


def timeline(samples: Sequence[tuple[float, float]], swaps: Sequence[tuple[float, float]]) -> dict[str, object]:
    """Requests and swaps on one clock, in seconds from the first request (JSON-ready, rounded to 0.1 ms and
    1 µs): ``{"requests": {"start_s": [...], "latency_ms": [...]}, "swaps": [[start_s, live_s], ...]}``. Pure."""
    ordered = sorted(samples)
    t0 = ordered[0][0] if ordered else min((a for a, _ in swaps), default=0.0)
    return {"requests": {"start_s": [round(t - t0, 4) for t, _ in ordered],
                         "latency_ms": [round(dt * 1e3, 3) for _, dt in ordered]},
            "swaps": [[round(a - t0, 4), round(b - t0, 4)] for a, b in swaps]}


class ClientPool:
    """One tritonclient client per calling thread (a client is not safe to share between threads), made on
    a thread's first :meth:`get` by ``make``; :meth:`close` (or leaving the ``with`` block) closes them all."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Any] = []

    def get(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make()
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pct(values: list[float], q: float) -> float:
    p = percentile(values, q)
    return float("nan") if p is None else p


def response_version(result: Any) -> str:
    """The weights version a tritonclient (HTTP or gRPC) result names: its ``HOTSWAP_WEIGHTS_VERSION`` output,
    one per row; a response whose rows disagree gives all of them, which matches no version."""
    versions = {v.decode() for v in np.asarray(result.as_numpy("HOTSWAP_WEIGHTS_VERSION")).reshape(-1)}
    return versions.pop() if len(versions) == 1 else repr(sorted(versions))


def utf8_response_version(result: Any) -> str:
    """The weights version a tritonclient result names in ``HOTSWAP_WEIGHTS_VERSION_UTF8`` (required), which
    must agree with ``HOTSWAP_WEIGHTS_VERSION`` where the model sends that too (numpy 1 in the stub); rows or
    outputs that disagree give all they say, which matches no version."""
    rows = result.as_numpy(VERSION_UTF8_OUTPUT)
    if rows is None:
        raise ValueError(f"the response has no {VERSION_UTF8_OUTPUT} output")
    rows = np.asarray(rows)
    versions = {decode_utf8(row) for row in rows.reshape(rows.shape[0], -1)}
    text = result.as_numpy(VERSION_OUTPUT)
    if text is not None:
        versions |= {v.decode() for v in np.asarray(text).reshape(-1)}
    return versions.pop() if len(versions) == 1 else repr(sorted(versions))


def classify(out: np.ndarray, expected: Mapping[str, np.ndarray], atol: float) -> list[str]:
    """Versions whose expected output ``out`` matches. Pure."""
    return [v for v, ref in expected.items() if ref.shape == out.shape and np.allclose(out, ref, atol=atol, rtol=0)]


def within(windows: Sequence[tuple[float, float]]) -> Callable[[float], bool]:
    """Whether a time falls inside any of ``windows`` (closed intervals), in log time per question. Pure."""
    merged: list[list[float]] = []
    for a, b in sorted(windows):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    starts = [a for a, _ in merged]

    def inside(t: float) -> bool:
        i = bisect.bisect_right(starts, t) - 1
        return i >= 0 and t <= merged[i][1]

    return inside


def run_swap_load(
    infer: Callable[[], np.ndarray | tuple[np.ndarray, str]],
    expected: Mapping[str, np.ndarray],
    swap_to: Callable[[str], None],
    order: list[str],
    *,
    clients: int = 4,
    warmup_s: float = 2.0,
    settle_s: float = 0.5,
    cooldown_s: float = 2.0,
    atol: float = 1e-4,
    max_requests: int = 200_000,
    observe: Callable[[float, float, str | None], None] | None = None,
    match: Callable[[np.ndarray, str | None], list[str]] | None = None,
    deadline: float | None = None,
) -> SwapLoadResult:
    """Clients call ``infer`` in a loop; ``swap_to(version)`` publishes and returns once it is live.

    ``infer`` may return ``(output, version)``: the version the server says computed the output
    (``HOTSWAP_WEIGHTS_VERSION``); a response whose version is not the one its output matches is torn.
    ``observe(start, latency, version)`` is called for every answered request (version None when torn),
    from the client threads: a benchmark sees when the clients first got a new version's answers.
    ``match(output, version)`` gives the versions an output matches (default: :func:`classify` against every
    one of ``expected``); a long run with thousands of versions checks the one the response names first.
    No swap starts after ``deadline`` (monotonic seconds).

    Latencies of requests that started inside a swap window (from publish to live plus
    ``settle_s``) count as "during swaps", the rest as steady. Loops are bounded.
    """
    stop = threading.Event()
    lock = threading.Lock()
    records: list[tuple[float, float]] = []  # (start, latency)
    errors: list[str] = []
    torn: list[str] = []
    seen: dict[str, int] = {}

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                got = infer()
            except Exception as e:  # counted, never fatal to the test run
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.monotonic() - t0
            out, said = got if isinstance(got, tuple) else (got, None)
            matched = match(out, said) if match is not None else classify(out, expected, atol)
            good = len(matched) == 1 and said in (None, matched[0])
            with lock:
                records.append((t0, dt))
                if good:
                    seen[matched[0]] = seen.get(matched[0], 0) + 1
                else:
                    torn.append(f"matched {matched}, response says {said!r}")
                if len(records) >= max_requests:
                    stop.set()
            if observe is not None:
                observe(t0, dt, matched[0] if good else None)

    threads = [threading.Thread(target=client, name=f"swapload-client-{i}") for i in range(clients)]
    windows: list[tuple[float, float]] = []
    spans: list[tuple[float, float]] = []
    for t in threads:
        t.start()
    try:
        time.sleep(warmup_s)
        for version in order:
            if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                break
            start = time.monotonic()
            swap_to(version)
            live = time.monotonic()
            spans.append((start, live))
            windows.append((start, live + settle_s))
            time.sleep(settle_s)
        time.sleep(cooldown_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    in_swap = within(windows)
    steady = [dt * 1e3 for t, dt in records if not in_swap(t)]
    during = [dt * 1e3 for t, dt in records if in_swap(t)]
    return SwapLoadResult(
        requests=len(records) + len(errors), errors=len(errors), torn=len(torn), swaps=len(windows),
        steady_p50_ms=_pct(steady, 50), steady_p99_ms=_pct(steady, 99),
        swap_p50_ms=_pct(during, 50), swap_p99_ms=_pct(during, 99), requests_during_swaps=len(during),
        versions_seen=dict(sorted(seen.items())), error_samples=tuple(errors[:5] + torn[:5]),
        samples=tuple(records), swap_spans=tuple(spans),
    )
