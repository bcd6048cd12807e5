"""A fake of the ``kvikio`` module, for machines where the real one cannot load (it needs libcufile and CUDA).

It follows KvikIO's documented Python API, host buffers only: ``CuFile(path, "r")``; ``CuFile.pread(buf, size,
file_offset, task_size)`` cuts the read into tasks of ``task_size`` bytes that a thread pool of
``defaults.get("num_threads")`` threads carries out with ``os.pread``, and returns a future whose ``get()``
is the number of bytes read (or raises what a task raised, as the real library's future does); a read smaller
than ``gds_threshold`` runs in the caller and raises from ``pread`` itself, as the library's does; a read past the
end of the file fails with the real library's message (``POSIX error on pread: EOF``). ``defaults.set`` with a
new ``num_threads`` replaces the pool, as the real library does. GPU tests run the real library
(tests/gpu/test_kvikio_cuda.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any


class FakeIOFuture:
    """``kvikio.IOFuture``: ``get()`` blocks until every task is done and returns the bytes read."""

    def __init__(self, tasks: list[Future[int]]) -> None:
        self._tasks = tasks

    def get(self) -> int:
        wait_futures(self._tasks)
        return sum(t.result() for t in self._tasks)

    def done(self) -> bool:
        return all(t.done() for t in self._tasks)


class FakeDefaults:
    """``kvikio.defaults``: ``get``/``set`` of ``num_threads`` and ``task_size`` (the library's defaults: 1 thread,
    4 MiB tasks), and compat mode (always: no GPUDirect Storage here)."""

    def __init__(self, owner: FakeKvikIO) -> None:
        self._owner = owner
        self.values: dict[str, Any] = {"num_threads": 1, "task_size": 4 << 20}

    def get(self, name: str) -> Any:
        return self.values[name]

    def set(self, *config: Any) -> None:
        items = config[0] if len(config) == 1 else {config[0]: config[1]}
        for key, value in items.items():
            if key not in self.values:
                raise KeyError(key)
            if key == "num_threads":
                self._owner.shutdown()  # the pool is replaced by one of the new size on the next read
            self.values[key] = value

    def is_compat_mode_preferred(self) -> bool:
        return True


class FakeKvikIO:
    """The module: ``CuFile``, ``defaults``, ``bounce_buffer_free``; records every ``pread`` call."""

    __version__ = "fake"

    def __init__(self) -> None:
        self.defaults = FakeDefaults(self)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        #: (path, buffer address, size, file_offset, task_size) of every pread call
        self.calls: list[tuple[str, int, int, int, int]] = []
        #: called as before_read(path, file_offset, size) in the caller's thread before each pread is queued
        self.before_read: Callable[[str, int, int], None] | None = None
        #: called as in_task(path, offset, nbytes) in a pool thread before each task reads
        self.in_task: Callable[[str, int, int], None] | None = None
        self.freed = 0
        self.opened: list[str] = []
        #: reads smaller than this run in the caller's thread (the library's default ``gds_threshold``: 1 MiB)
        self.gds_threshold = 1 << 20
        fake = self

        class CuFile:
            def __init__(self, file: str | os.PathLike[str], flags: str = "r") -> None:
                if flags != "r":
                    raise ValueError("the fake only reads")
                self.path = os.fspath(file)
                self._fd: int | None = os.open(self.path, os.O_RDONLY)
                fake.opened.append(self.path)

            @property
            def closed(self) -> bool:
                return self._fd is None

            def close(self) -> None:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

            def fileno(self) -> int:
                assert self._fd is not None
                return self._fd

            def __enter__(self) -> CuFile:
                return self

            def __exit__(self, *exc: object) -> None:
                self.close()

            def pread(self, buf: Any, size: int | None = None, file_offset: int = 0,
                      task_size: int | None = None) -> FakeIOFuture:
                if hasattr(buf, "__cuda_array_interface__"):
                    raise TypeError("the fake reads into host buffers only")
                view = memoryview(buf).cast("B")
                if view.readonly:
                    raise ValueError("read-only buffer")
                n = view.nbytes if size is None else size
                if n > view.nbytes:
                    raise ValueError("Size is greater than the size of the buffer")
                step = task_size or fake.defaults.get("task_size")
                address = buf.__array_interface__["data"][0] if hasattr(buf, "__array_interface__") else 0
                fake.calls.append((self.path, address, n, file_offset, step))
                if fake.before_read is not None:
                    fake.before_read(self.path, file_offset, n)
                fd = self.fileno()
                if n < fake.gds_threshold:  # as the library does: read in the caller, errors raised from here
                    done: Future[int] = Future()
                    done.set_result(fake._task(self.path, fd, view[:n], file_offset))
                    return FakeIOFuture([done])
                pool = fake.pool()
                return FakeIOFuture([pool.submit(fake._task, self.path, fd, view[a:min(a + step, n)], file_offset + a)
                                     for a in range(0, n, step)])

        self.CuFile = CuFile

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.defaults.get("num_threads"), thread_name_prefix="fake-kvikio")
            return self._pool

    def _task(self, path: str, fd: int, view: memoryview, offset: int) -> int:
        if self.in_task is not None:
            self.in_task(path, offset, len(view))
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise RuntimeError("POSIX error on pread: EOF")
            done += n
        return done

    def bounce_buffer_free(self) -> int:
        self.freed += 1
        return 0

    def shutdown(self) -> None:
        """Stop the pool's threads (the real library's pool is replaced the same way)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def live_threads(self) -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("fake-kvikio") and t.is_alive())
