"""Work done in a forked child while this process goes on: a report's figures, drawn on another core while
the sweep's refit trains here (matplotlib's layout is CPU work that holds the GIL, so a thread would not
overlap it).

The child gets a copy of this process's memory (the runs already read, matplotlib already imported) and
must not touch what it shares with the parent: no database connection, no pipe to the metric writer, no
printing. It sends its result back pickled through a pipe and leaves with `os._exit` (no atexit handler,
no flush of the parent's buffers). Where fork is unavailable (Windows) or fails, or the child dies without
an answer, the work is done here instead: the same result, later.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Forked(Generic[T]):
    """`work()` started in a child process now; `result()` waits for its value (or raises its error)."""

    def __init__(self, work: Callable[[], T], orphaned: Callable[[], None] | None = None):
        """`orphaned()` runs in the child when the parent is gone before the answer (kill -9 of the
        parent): what the parent would have cleaned up, e.g. a temporary folder the work filled."""
        self.work, self.orphaned = work, orphaned
        self.pid: int | None = None
        self.reader: int | None = None
        if hasattr(os, "fork") and sys.platform != "darwin":  # macOS: fork after threads can crash the child
            with contextlib.suppress(OSError):
                self._fork()

    def _fork(self) -> None:
        reader, writer = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: "multi-threaded, use of fork()"
            pid = os.fork()
        if pid == 0:
            gc.freeze()  # the child's collections leave the parent's objects alone: no page copied for them
            os.close(reader)
            self._child(writer)
        os.close(writer)
        self.pid, self.reader = pid, reader

    def _child(self, writer: int) -> None:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):  # the parent's handlers raise in the parent's code
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a parent gone: BrokenPipeError below, not death
            try:
                answer = (True, self.work())
            except Exception as error:  # noqa: BLE001 (handed to the parent, which decides)
                answer = (False, error)
            try:
                data = pickle.dumps(answer)
            except Exception as error:  # noqa: BLE001
                data = pickle.dumps((False, RuntimeError(f"unpicklable result: {error}")))
            try:
                with open(writer, "wb") as pipe:
                    pipe.write(data)
            except BrokenPipeError:  # nobody reads: the parent is gone
                if self.orphaned is not None:
                    self.orphaned()
        finally:
            os._exit(0)

    def result(self) -> T:
        """The work's value: the child's, or this process's where there was no child or it died silently."""
        if self.pid is None:
            return self.work()
        with open(self.reader, "rb") as pipe:
            data = pipe.read()
        os.waitpid(self.pid, 0)
        self.pid = None
        if not data:  # killed (OOM, a signal to it alone) before it answered: do the work here
            return self.work()
        finished, value = pickle.loads(data)
        if not finished:
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child (the caller is ending without its result)."""
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            with contextlib.suppress(OSError):
                os.close(self.reader)
            self.pid = None


def in_parallel(works: list[Callable[[], T]], processes: int | None = None) -> list[T]:
    """Every work's value, in order: split round-robin over `processes` (default: the cores this process
    may use), this process doing the first share while forked children do the others."""
    processes = max(1, min(processes or usable_cores(), len(works)))
    shares = [works[i::processes] for i in range(processes)]
    children = [Forked(lambda share=share: [work() for work in share]) for share in shares[1:]]
    try:
        done = [[work() for work in shares[0]], *(child.result() for child in children)]
    finally:
        for child in children:
            child.cancel()
    values: list[T] = [None] * len(works)  # type: ignore[list-item]
    for start, share in enumerate(done):
        values[start::processes] = share
    return values


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
