"""ClientPool: one client per thread, every one closed by close()."""

from __future__ import annotations

import threading

from serving.triton.swapload import ClientPool


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
