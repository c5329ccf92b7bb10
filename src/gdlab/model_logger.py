"""A trained network logged as an MLflow model (gdlab.logged_model) by a forked child of the command, for a
command that never imports MLflow itself (a tracked sweep: gdlab.writer_client, gdlab.writer_calls).

MLflow's pytorch flavour needs MLflow (~0.7 s of CPU to import), torch and Lightning (it imports Lightning
for its autologging: ~3.5 s in a process without them, such as the metric writer). So the child is forked
once the command holds torch and Lightning, and imports MLflow on another core while the trials train; the
refit hands it the network and waits for the model's URI. Where there is no child (no fork, or it died), the
model is logged in this process.

The child holds nothing of the record (the metric writer writes the runs): a SIGTERM or Ctrl-C to the
command's process group ends it at once, as it ends the command (the refit's run ends KILLED). It holds none
of the command's output (its own goes to /dev/null: an error is handed back), and leaves with `os._exit`
when this process closes its end of the pipe (or dies).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import struct
import sys
import warnings

_RUNNING: list[ModelLogger] = []


class ModelLogger:
    """The forked child; `log` hands it a network."""

    def __init__(self, pid: int, requests: int, answers: int):
        self.pid, self.requests, self.answers = pid, requests, answers

    @classmethod
    def start(cls) -> None:
        """Fork the child, once per process (not where fork is missing or unsafe: then `log` does it here)."""
        if _RUNNING or not hasattr(os, "fork") or sys.platform == "darwin":
            return
        with contextlib.suppress(OSError):
            _RUNNING.append(fork())

    @classmethod
    def running(cls) -> ModelLogger | None:
        return _RUNNING[0] if _RUNNING else None

    @classmethod
    def open_store(cls, uri: str) -> None:
        """Have the child open the store now (its first opening costs ~0.4 s: MLflow checks the schema),
        once it exists, so the model is not kept waiting for it."""
        logger = cls.running()
        if logger is not None:
            import io

            import torch

            buffer = io.BytesIO()
            torch.save({"store": uri}, buffer)
            with contextlib.suppress(OSError):
                send(logger.requests, buffer.getvalue())

    def log(self, uri: str, run_id: str, model, X, epochs: int, name: str | None) -> tuple[str, int | None]:
        """gdlab.logged_model.log_model(uri, run_id, model, X, epochs, name), by the child: (the model's URI,
        its registered version); its error raised here. Done here where the child is gone."""
        import io

        import torch

        buffer = io.BytesIO()
        torch.save({"uri": uri, "run_id": run_id, "model": model, "X": X, "epochs": epochs, "name": name},
                   buffer)  # fmt: skip
        try:
            send(self.requests, buffer.getvalue())
            answer = receive(self.answers)
        except OSError:
            answer = None
        if answer is None:  # the child died: this process logs it
            self.close()
            from gdlab.logged_model import log_model

            return log_model(uri, run_id, model, X, epochs, name)
        done, value = pickle.loads(answer)
        if not done:
            raise RuntimeError(value)
        return value

    @classmethod
    def stop(cls) -> None:
        """End the child, if any: the sweep that started it is over."""
        for logger in list(_RUNNING):
            logger.close()

    def close(self) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        for end in (self.requests, self.answers):
            with contextlib.suppress(OSError):
                os.close(end)
        with contextlib.suppress(OSError):
            os.waitpid(self.pid, 0)


def fork() -> ModelLogger:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    inherited = writer_pipes()  # read here: in the child, a thread of this process may hold their locks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: "multi-threaded, use of fork()"
        pid = os.fork()
    if pid == 0:
        gc.freeze()  # the parent's objects (its database connections) are never collected (finalized) here
        os.close(from_parent)
        os.close(to_parent)
        serve(to_child, from_child, inherited)
    os.close(to_child)
    os.close(from_child)
    return ModelLogger(pid, from_parent, to_parent)


def serve(requests: int, answers: int, inherited: list[int]) -> None:
    """The child: MLflow imported now, then each network received logged, until the pipe closes."""
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):  # the parent's handlers raise in the parent's code
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for end in inherited:  # held here, the metric writer would not see its input end with the command
            with contextlib.suppress(OSError):
                os.close(end)
        quiet = os.open(os.devnull, os.O_RDWR)  # nor would a caller reading the command's output to its end
        for end in (0, 1, 2):
            os.dup2(quiet, end)
        import torch

        torch.set_num_threads(1)  # the parent's thread pool is not this process's
        import io

        import mlflow

        from gdlab.logged_model import log_model, warm_up
        from gdlab.masking import error_line

        with contextlib.suppress(Exception):  # a failure here is met again, and reported, by log_model
            warm_up()

        while (request := receive(requests)) is not None:
            job = torch.load(io.BytesIO(request), weights_only=False)
            if "store" in job:  # `open_store`: unanswered
                with contextlib.suppress(Exception):
                    mlflow.MlflowClient(job["store"]).search_experiments(max_results=1)
                continue
            try:
                answer = (True, log_model(job["uri"], job["run_id"], job["model"], job["X"], job["epochs"],
                                          job["name"]))  # fmt: skip
            except Exception as error:  # noqa: BLE001 (the parent's to report)
                answer = (False, error_line(error))
            send(answers, pickle.dumps(answer))
    finally:
        os._exit(0)


def writer_pipes() -> list[int]:
    """The file descriptors of this process's pipes to its metric writers."""
    from gdlab.metric_writer import MetricWriter

    ends = []
    for writer in MetricWriter._instances.values():
        for stream in (writer.process.stdin, writer.process.stdout):
            with contextlib.suppress(OSError, ValueError):
                ends.append(stream.fileno())
    return ends


def send(end: int, data: bytes) -> None:
    message = struct.pack("<Q", len(data)) + data
    while message:
        message = message[os.write(end, message) :]


def receive(end: int) -> bytes | None:
    """A message, or None at the end of the pipe."""
    header = read_exactly(end, 8)
    if header is None:
        return None
    return read_exactly(end, struct.unpack("<Q", header)[0])


def read_exactly(end: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(end, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
