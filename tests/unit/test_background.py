"""Background threads run below serving threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.background import BACKGROUND_NICE, lower_priority


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no per-thread priorities on this platform")
def test_pool_threads_run_at_a_lower_priority_and_the_caller_does_not() -> None:
    def own() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = own()
    with ThreadPoolExecutor(1, initializer=lower_priority) as pool:
        theirs = pool.submit(own).result()
    assert theirs == min(19, mine + BACKGROUND_NICE)
    assert own() == mine
