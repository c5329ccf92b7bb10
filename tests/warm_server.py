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

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import time


def preload() -> dict[str, str]:
    """Import what gdlab's commands import; return the environment variables those imports set (gdlab.stores
    sets MLflow's defaults), to be set again in each child over the test's own environment."""
    before = dict(os.environ)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (a metric writer's)
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
    import gdlab.writer_process  # noqa: F401

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
    if os.environ.get("GDLAB_TEST_COLD_CHILDREN") != "1":
        start_zygote(set_by_imports)
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


# `python -m MODULE` children of a command that start from the command's zygote (see `start_zygote`).
ZYGOTE_MODULES = ("gdlab.writer_process", "gdlab.sweep")
PR_SET_CHILD_SUBREAPER = 36


def start_zygote(set_by_imports: dict[str, str]) -> None:
    """In a command, before it runs: fork a zygote (the server's imports, nothing of the command's yet: no
    thread, no open store; a process forked with a SQLite file open breaks SQLite's locks in the child) that
    starts the command's own `python -m gdlab.writer_process` (its metric writer, ~2.8 s of CPU to import
    MLflow) and `python -m gdlab.sweep --worker` (a `--workers` worker, ~6.7 s) as forks of itself instead
    of new interpreters. Each such child is still the command's own: the zygote forks twice and the middle
    process exits, so the child is reparented to the command (a child subreaper), which waits for it,
    signals it and reads its exit status as subprocess does; it is in the command's process group (or its
    own new session, if asked), with the command's signal mask, the environment, folder, argv and standard
    streams the command gave Popen. Anything else (other commands, `pass_fds`, a shell) starts as
    subprocess starts it. The zygote is in a process group of its own with every signal blocked, so a
    signal to the command's group is not its; it ends with the command (atexit), or when the command is
    gone. GDLAB_TEST_COLD_CHILDREN=1 leaves it out."""
    import atexit
    import ctypes
    import threading

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return
    ours, theirs = socket.socketpair()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the zygote's from its start
    pid = os.fork()
    if pid == 0:
        ours.close()
        zygote(theirs, set_by_imports)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # as the zygote does itself: whichever comes first, no group signal reaches it
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    theirs.close()
    lock = threading.Lock()  # one request at a time on the connection
    patch_popen(ours, lock)

    def end_zygote() -> None:
        if lock.acquire(timeout=2):
            with contextlib.suppress(OSError):
                ours.sendall(b"%08d" % 0)  # the zygote's end
        ours.close()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    time.sleep(0.01)
                    continue
            return
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    atexit.register(end_zygote)


def zygote(conn: socket.socket, set_by_imports: dict[str, str]) -> None:
    """Serve the command's requests until it ends them or goes away: answer each with the pid of the child
    started, or -1 where none was (then the command starts a new interpreter). Never returns."""
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):  # the command's streams stay the command's: its readers see their end
            os.dup2(devnull, target)
        while True:
            header, fds, _, _ = socket.recv_fds(conn, 8, 3)
            if not header or not int(header):
                break
            request = json.loads(read_exactly(conn, int(header)))
            conn.sendall(b"%d\n" % start_child(conn, request, fds, set_by_imports))
            for fd in fds:
                os.close(fd)
    finally:
        os._exit(0)


def start_child(conn: socket.socket, request: dict, fds: list[int], set_by_imports: dict[str, str]) -> int:
    """In the zygote: fork a middle process that forks the child and exits; the child's pid, or -1."""
    read, write = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        return -1
    if middle == 0:
        try:
            os.close(read)
            ready, set_up = os.pipe()
            started = os.fork()
            if started == 0:
                for fd in (write, ready):
                    os.close(fd)
                conn.close()
                module_child(request, fds, set_by_imports, set_up)
            os.close(set_up)
            os.read(ready, 1)  # its session or group is set (or it died): as when Popen returns
            os.write(write, b"%d" % started)
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(middle, 0)
    with os.fdopen(read, "rb") as answer:
        started = answer.read()
    return int(started) if started else -1


def module_child(request: dict, fds: list[int], set_by_imports: dict[str, str], set_up: int) -> None:
    """In the zygote's grandchild: become `python -m MODULE` as the command's Popen asked; tell `set_up`
    once its session or process group is the one asked. Never returns."""
    try:
        with open("/proc/self/comm", "w") as comm:  # its command line is the server's; its name tells
            comm.write(request["module"].rsplit(".", 1)[-1][:15])
        if request["new_session"]:
            os.setsid()
        else:
            os.setpgid(0, request["process_group"])  # the command's: the zygote's own is not
        os.write(set_up, b".")
        os.close(set_up)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in set_by_imports.items():
            os.environ.setdefault(key, value)
        tempfile.tempdir = None
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
        os.chdir(request["cwd"])
        pythonpath = [path for path in request["env"].get("PYTHONPATH", "").split(os.pathsep) if path]
        sys.path[:1] = [request["cwd"], *pythonpath]  # as `python -m` begins it (not the server's folder)
        sys.argv = [f"-m:{request['module']}", *request["argv"]]
        if request["module"] == "gdlab.sweep":  # a worker: its own metric writer from a zygote of its own
            start_zygote(set_by_imports)
        signal.pthread_sigmask(signal.SIG_SETMASK, request["mask"])  # the command's, from here on
        import runpy

        from gdlab.process_exit import exit_now

        for name in (request["module"], f"{request['module']}.__main__"):
            sys.modules.pop(name, None)  # `python -m` runs it afresh as __main__
        exit_now(lambda: runpy.run_module(request["module"], run_name="__main__", alter_sys=True) and None)
    except BaseException as error:
        exit_after(error)
    finally:
        os._exit(1)


def patch_popen(conn: socket.socket, lock) -> None:
    """subprocess.Popen in the command: `python -m` one of ZYGOTE_MODULES from the zygote on `conn`."""
    import inspect
    import subprocess

    original = subprocess.Popen._execute_child
    names = list(inspect.signature(original).parameters)[1:]  # CPython's own: args, executable, ...
    command = os.getpid()  # not in a child the command forks (the model logger's, a figure's)

    def execute_child(self, *arguments):
        a = dict(zip(names, arguments, strict=True))
        argv = [] if isinstance(a["args"], (str, bytes)) else [os.fsdecode(arg) for arg in a["args"]]
        plain = os.getpid() == command and not a["shell"] and a["preexec_fn"] is None and a["umask"] < 0
        plain = plain and not a["pass_fds"] and a["process_group"] in (None, -1)
        plain = plain and (a["gid"], a["gids"], a["uid"]) == (None, None, None)
        if not (plain and argv[:2] == [sys.executable, "-m"] and argv[2:3] and argv[2] in ZYGOTE_MODULES):
            return original(self, *arguments)
        fds = [a["p2cread"], a["c2pwrite"], a["errwrite"]]
        fds = [fd if fd != -1 else inherited for fd, inherited in zip(fds, (0, 1, 2), strict=True)]
        request = {
            "module": argv[2], "argv": argv[3:], "new_session": bool(a["start_new_session"]),
            "process_group": os.getpgrp(), "env": dict(os.environ if a["env"] is None else a["env"]),
            "cwd": os.fspath(a["cwd"]) if a["cwd"] is not None else os.getcwd(),
            "mask": sorted(int(signum) for signum in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        }  # fmt: skip
        payload = json.dumps(request).encode()
        with lock:
            pid = ask_zygote(conn, fds, payload)
        if pid is None:  # no zygote, or it started nothing: a new interpreter, as subprocess starts one
            return original(self, *arguments)
        while parent_of(pid) not in (os.getpid(), None):  # until the middle process has exited
            time.sleep(0.0005)
        self.pid = pid
        self._child_created = True
        self._close_pipe_fds(*(a[name] for name in ("p2cread", "p2cwrite", "c2pread", "c2pwrite", "errread",
                                                    "errwrite")))  # fmt: skip

    subprocess.Popen._execute_child = execute_child


def ask_zygote(conn: socket.socket, fds: list[int], payload: bytes) -> int | None:
    """The pid of the child the zygote started for the request, None if it started none. Interrupted
    halfway (a signal's exception in this thread), the connection is closed, so that the zygote and this
    process are never out of step: the zygote ends, and later children start as new interpreters."""
    if conn.fileno() == -1:
        return None
    try:
        socket.send_fds(conn, [b"%08d" % len(payload)], fds)
        conn.sendall(payload)
        pid = int(read_line(conn))
    except OSError:
        conn.close()
        return None
    except BaseException:
        conn.close()
        raise
    return pid if pid > 0 else None


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise ConnectionError("the zygote went away")
        line += chunk
    return line


def child(request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """run_child, and what the interpreter does with an exception nothing caught. Never returns."""
    try:
        run_child(request, fds, set_by_imports)
    except BaseException as error:
        exit_after(error)
    finally:
        os._exit(1)


def exit_after(error: BaseException) -> None:
    """What the interpreter does with an exception nothing caught: its traceback, the exit steps, status 1
    (the caller's os._exit) or, for Ctrl-C, death by SIGINT."""
    sys.excepthook(type(error), error, error.__traceback__)
    from gdlab.process_exit import join_threads

    join_threads()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if isinstance(error, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        os.kill(os.getpid(), signal.SIGINT)


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
