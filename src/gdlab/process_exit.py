"""`exit_now`: how every gdlab command and the metric writer process end: the exit status once everything
they do is done, without the interpreter's teardown of the modules they loaded (1-3 s of freeing torch,
Lightning and MLflow)."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def exit_now(command: Callable[[], int | None]) -> NoReturn:
    """Run `command` and exit with its status as `sys.exit` would: first whatever a normal exit does that
    a record needs (non-daemon threads joined, atexit handlers such as logging's and MLflow's run,
    output flushed), then `os._exit`, skipping only the freeing of modules. An exception other than
    SystemExit propagates as usual (its traceback, the normal exit)."""
    try:
        status = command()
    except SystemExit as stop:
        status = stop.code
    if status is not None and not isinstance(status, int):  # sys.exit("message"): printed, status 1
        print(status, file=sys.stderr)
        status = 1
    join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(status or 0)


def join_threads() -> None:
    """What the interpreter does first at exit (CPython's `threading._shutdown`): the threading module's own
    exit calls, which stop idle ThreadPoolExecutor workers (MLflow keeps one per artifact repository), then
    every non-daemon thread joined. Joining those workers without them would wait forever."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
