"""The suite's warm process server: it imports what a gdlab command imports once, then forks a real process
for each command a test starts (see warm.py). Run as `python warm_server.py SOCKET`.

A forked child is a new process in its own session with the test's argv, cwd, environment and standard
streams; it runs the console script's function (or `python -m MODULE`) exactly as the installed script
would, and ends the way a command ends (gdlab.process_exit). Only the ~5 s of imports are shared; nothing of
a command's own work is. The server stays single-threaded, so forking it is safe.

Protocol on a Unix socket, one connection per command: the client sends 8 bytes (the request's length)
with three file descriptors (stdin, stdout, stderr), then the request as JSON; the server answers
"PID\\n" once forked and "STATUS\\n" (os.waitpid's) when the process ends.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import tempfile


def preload() -> dict[str, str]:
    """Import what gdlab's commands import; return the environment variables those imports set (gdlab.stores
    sets MLflow's defaults), to be set again in each child over the test's own environment."""
    before = dict(os.environ)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401
    import optuna  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import torch._dynamo  # noqa: F401  (Lightning's trainer.fit imports it)

    import gdlab.entry  # noqa: F401
    import gdlab.report  # noqa: F401
    import gdlab.sweep.cli  # noqa: F401
    import gdlab.sweep.parent_run  # noqa: F401
    import gdlab.tracking  # noqa: F401
    import gdlab.train  # noqa: F401

    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def run_child(request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """In the forked process: become the command, run it, exit as it would. Never returns."""
    os.setsid()
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as a new interpreter has it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in set_by_imports.items():
        os.environ.setdefault(key, value)
    tempfile.tempdir = None  # the preload's imports chose it from the server's TMPDIR: the command's now
    if os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    from gdlab.process_exit import exit_now

    if request.get("path"):  # `python FILE.py`: the file's folder first on sys.path, as python puts it
        import runpy

        sys.path.insert(0, os.path.dirname(os.path.abspath(request["path"])))
        exit_now(lambda: runpy.run_path(request["path"], run_name="__main__") and None)
    if request["module"]:
        import runpy

        sys.modules.pop(request["module"], None)  # `python -m` runs it afresh as __main__
        exit_now(lambda: runpy.run_module(request["module"], run_name="__main__", alter_sys=True) and None)
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=request["script"])
    exit_now(script.load())


def child(request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """run_child, and what the interpreter does with an exception nothing caught: its traceback, the exit
    steps, status 1 (or, for Ctrl-C, death by SIGINT). Never returns."""
    try:
        run_child(request, fds, set_by_imports)
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        from gdlab.process_exit import join_threads

        join_threads()
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if isinstance(error, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        os._exit(1)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def serve(path: str) -> None:
    set_by_imports = preload()
    assert sys.modules["threading"].active_count() == 1, "the server must stay single-threaded to fork"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for this name: the server is ready
    parent = os.getppid()
    waiting: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        for _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            try:
                header, fds, _, _ = socket.recv_fds(conn, 8, 3)
                request = json.loads(read_exactly(conn, int(header)))
            except (ConnectionError, ValueError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                selector.close()
                for other in (conn, *waiting.values()):
                    other.close()
                child(request, fds, set_by_imports)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{status}\n".encode())
                except OSError:
                    pass
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
