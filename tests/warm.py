"""`run` and `Popen` as in the subprocess module, for the suite's gdlab commands: each command is a real
process forked from a warm server (warm_server.py) that has already imported torch, Lightning, MLflow,
Optuna and Hydra, instead of a new interpreter that imports them again (~5 s a command on 2 cores).

The process is the command: its own pid and session (signal it, or its group, as a started script), the
test's argv, cwd, environment and pipes, the console script's function (or the script file a test wrote,
`python FILE.py`) and its exit status. What is neither (`mlflow server`, `python -c`, a shell) is started by
subprocess itself, and so is every command when GDLAB_TEST_COLD=1 (the suite as it was, for comparison).
A warm command's own metric writer and `--workers` workers start warm too, from a zygote the command forks
before it runs (warm_server.start_zygote), as the command's own children; GDLAB_TEST_COLD_CHILDREN=1 in a
command's environment starts them as new interpreters."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
TimeoutExpired, CompletedProcess, CalledProcessError = (
    subprocess.TimeoutExpired,
    subprocess.CompletedProcess,
    subprocess.CalledProcessError,
)
SCRIPTS = ("gdlab-train", "gdlab-sweep", "gdlab-report")


def warm_command(args) -> dict | None:
    """What the warm server runs for `args` ({"script"}, {"module"} or {"path"}: a console script, `python -m
    gdlab.X` or `python FILE.py`); None if not one of those."""
    if os.environ.get("GDLAB_TEST_COLD") == "1" or isinstance(args, (str, bytes)):
        return None
    args = [str(a) for a in args]
    name = Path(args[0]).name
    if name in SCRIPTS and (os.sep not in args[0] or Path(args[0]).parent == Path(sys.executable).parent):
        return {
            "script": name,
            "module": None,
            "argv": [str(Path(sys.executable).with_name(name)), *args[1:]],
        }
    if args[0] == sys.executable and len(args) > 2 and args[1] == "-m" and args[2].startswith("gdlab."):
        return {"script": None, "module": args[2], "argv": [f"-m:{args[2]}", *args[3:]]}
    if args[0] == sys.executable and len(args) > 1 and args[1].endswith(".py") and Path(args[1]).is_file():
        return {"script": None, "module": None, "path": args[1], "argv": args[1:]}  # a user's script
    return None


class _Server:
    """One warm server per test process (per xdist worker), started on first use."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.path = ""
        self.lock = threading.Lock()

    def address(self) -> str:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.path = str(Path(tempfile.mkdtemp(prefix="gdlab-warm-")) / "socket")
                self.process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("warm_server.py")), self.path],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                atexit.register(self.process.kill)
            while not os.path.exists(self.path):
                if self.process.poll() is not None:
                    raise RuntimeError(f"the warm server exited with {self.process.returncode}")
                time.sleep(0.05)
            return self.path


SERVER = _Server()


def _child_end(spec, mode: str, inherited: int):
    """(fd for the child, fd of the test's end or None, fd to close here after sending)."""
    if spec is None:
        return inherited, None, None
    if spec == DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        return fd, None, fd
    if spec == PIPE:
        read, write = os.pipe()
        if mode == "r":
            return read, write, read
        return write, read, write
    fd = spec if isinstance(spec, int) else spec.fileno()
    return fd, None, None


class Popen:
    """subprocess.Popen for a gdlab command (see the module's doc); the subset the suite uses."""

    def __new__(cls, args, **kwargs):
        if warm_command(args) is None:
            return subprocess.Popen(args, **kwargs)
        return super().__new__(cls)

    def __init__(self, args, *, cwd=None, env=None, stdin=None, stdout=None, stderr=None, text=False,
                 universal_newlines=None, start_new_session=False, encoding=None, errors=None):  # fmt: skip
        command = warm_command(args)
        self.args = args
        self.returncode: int | None = None
        text = bool(text or universal_newlines or encoding or errors)
        ends = [_child_end(stdin, "r", 0), _child_end(stdout, "w", 1)]
        ends.append((ends[1][0], None, None) if stderr == STDOUT else _child_end(stderr, "w", 2))
        modes = ("wb", "rb", "rb")
        self.stdin, self.stdout, self.stderr = (self._wrap(end[1], mode, text, encoding, errors)
                                                for end, mode in zip(ends, modes, strict=True))  # fmt: skip
        request = {**command, "cwd": str(cwd or os.getcwd()), "env": dict(os.environ if env is None else env)}
        payload = json.dumps(request).encode()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(SERVER.address())
            socket.send_fds(self._conn, [b"%08d" % len(payload)], [end[0] for end in ends])
            self._conn.sendall(payload)
            self._answers = b""
            self.pid = int(self._answer(None))
            self._wait_for_own_session()
        finally:
            for end in ends:
                if end[2] is not None:
                    os.close(end[2])
        self._readers: list[threading.Thread] = []
        self._output: dict[str, list] = {}

    @staticmethod
    def _wrap(fd, mode, text, encoding, errors):
        if fd is None:
            return None
        stream = open(fd, mode, buffering=0 if mode == "wb" else -1)
        if not text:
            return stream
        return io.TextIOWrapper(stream, encoding=encoding or "utf-8", errors=errors or "strict",
                                write_through=mode == "wb")  # fmt: skip

    def _wait_for_own_session(self) -> None:
        """Until the child has called setsid (its first step): as with subprocess, a signal to its group
        right after starting it reaches it alone."""
        with contextlib.suppress(ProcessLookupError):
            while os.getsid(self.pid) != self.pid:
                time.sleep(0.001)

    def _answer(self, timeout: float | None) -> bytes | None:
        """The server's next line, or None if it has not come within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._answers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(64)
            if not chunk:
                raise ConnectionError("the warm server went away")
            self._answers += chunk
        line, self._answers = self._answers.split(b"\n", 1)
        return line

    def _status(self, timeout: float | None) -> int | None:
        line = self._answer(timeout)
        if line is None:
            return None
        self._conn.close()
        status = int(line)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._status(timeout)
            if self.returncode is None:
                raise TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def _read_all(self, name: str) -> None:
        self._output[name].append(getattr(self, name).read())

    def communicate(self, input=None, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._readers:
            if self.stdin is not None:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            for name in ("stdout", "stderr"):
                if getattr(self, name) is not None:
                    self._output[name] = []
                    self._readers.append(threading.Thread(target=self._read_all, args=(name,), daemon=True))
                    self._readers[-1].start()
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        found = []
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            found.append(self._output[name][0] if stream is not None else None)
            if stream is not None:
                stream.close()
        return tuple(found)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None and not stream.closed and not self._readers:
                stream.close()
        self.wait()


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run, with a gdlab command started warm."""
    if warm_command(args) is None:
        return subprocess.run(args, input=input, capture_output=capture_output, timeout=timeout, check=check,
                              **kwargs)  # fmt: skip
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = PIPE
    if input is not None:
        kwargs["stdin"] = PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except TimeoutExpired:
            process.kill()
            process.wait()
            raise
    if check and process.returncode:
        raise CalledProcessError(process.returncode, args, stdout, stderr)
    return CompletedProcess(args, process.returncode, stdout, stderr)
