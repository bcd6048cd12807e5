"""Helpers for threads that work beside serving (hashing, reading checkpoints)."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

#: how much lower than serving threads background work runs (Linux nice increment, per thread)
BACKGROUND_NICE = 10


def lower_priority() -> None:
    """Run the calling thread at a lower CPU priority, so requests served meanwhile win the CPU.

    A ``ThreadPoolExecutor(initializer=lower_priority)``: on Linux ``setpriority`` with a thread id
    affects that thread only. Elsewhere, or where not permitted, it is a no-op (logged at debug).
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError) as e:
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, e)
