"""bench.lib.swapload: one client per thread, every one closed by close(); the per-request timeline."""

from __future__ import annotations

import threading

from bench.lib.swapload import ClientPool, SwapLoadResult, timeline


class Recorder:
    """Stands in for a tritonclient client: it only records being closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_client_per_thread_and_all_closed() -> None:
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    with ClientPool(make) as pool:
        mine = pool.get()
        assert pool.get() is mine  # the same thread keeps its client
        seen: list[object] = []
        threads = [threading.Thread(target=lambda: seen.append(pool.get())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(c) for c in [mine, *seen]}) == 4 and len(made) == 4
        assert not any(c.closed for c in made)
    assert all(c.closed for c in made)


def test_the_timeline_puts_requests_and_swaps_on_one_clock_from_the_first_request() -> None:
    samples = [(100.5, 0.002), (100.0, 0.0041234), (101.25, 0.5)]
    got = timeline(samples, [(100.2, 100.9)])
    assert got == {"requests": {"start_s": [0.0, 0.5, 1.25], "latency_ms": [4.123, 2.0, 500.0]},
                   "swaps": [[0.2, 0.9]]}
    assert timeline([], []) == {"requests": {"start_s": [], "latency_ms": []}, "swaps": []}


def test_a_swap_load_result_keeps_its_timeline_out_of_its_summary() -> None:
    r = SwapLoadResult(requests=1, errors=0, torn=0, swaps=1, steady_p50_ms=1.0, steady_p99_ms=1.0, swap_p50_ms=1.0,
                       swap_p99_ms=1.0, requests_during_swaps=0, samples=((5.0, 0.001),), swap_spans=((5.5, 6.0),))
    assert "samples" not in r.to_json() and "swap_spans" not in r.to_json() and r.to_json()["requests"] == 1
    assert r.timeline() == {"requests": {"start_s": [0.0], "latency_ms": [1.0]}, "swaps": [[0.5, 1.0]]}
