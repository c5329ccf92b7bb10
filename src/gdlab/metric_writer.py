"""The metric pipe: `MetricWriter` in the training process, gdlab.writer_process.main in the writer process.

The writer process is `python -m gdlab.writer_process`, with the tracking URI in $GDLAB_METRIC_WRITER_URI
(never on a command line: `ps` shows those). It reads JSON lines on stdin, to log:
  {"run": ID, "metrics": [[key, value, timestamp, step], ...]}, {"run": ID, "params": [[key, value], ...]},
  {"run": ID, "tags": [[key, value], ...]}, {"run": ID, "artifacts": FOLDER},
  {"run": ID, "inputs": [DATASET, ...]} (gdlab.run_inputs: MLflow's Dataset.to_dict() and its context),
  {"rows": {"key": KEY, "name": NAME, "splits": [[CONTEXT, FEATURES, TARGETS], ...]}} (ARRAYs, below) and
  {"run": ID, "inputs_of": KEY}: the datasets of those rows (gdlab.dataset_entities), made here once,
  {"run": ID, "end": STATUS, "end_time": MS};
  {"columns": {"runs": [ID, ...], "keys": [KEY, ...], "timestamps": [MS per epoch],
  "steps": ARRAY (epochs, runs), "values": ARRAY (epochs, keys, runs)}}: a population's epochs in bulk
  (gdlab.run_epochs), one row per value that is not NaN, ARRAY being {"dtype", "shape", "data": base64};
and {"drain": ID, "id": N}, answered with {"run": ID, "id": N, "error": TEXT|null, "path": "bulk"|"log_batch"}
on stdout once everything before it is written; {"call": NAME, "kwargs": {...}, "id": N}:
gdlab.writer_calls.NAME run here on this process's client once everything before it is written, answered
with {"reply": N, "result": JSON, "error": TEXT|null} (the store work of a tracked sweep's command, which
would otherwise import MLflow: ~0.7 s of its CPU).
Whatever has arrived is written in one go (gdlab.metric_store:
one transaction for every run on MLflow's SQL stores). It exits at end of input, so it never outlives
the training process.

Light on purpose (the standard library at import; MLflow only inside `main`): the writer process runs
this module, and the training process imports `MetricWriter` from it (through gdlab.tracking).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

from gdlab.interrupts import held_for_children

URI_ENV = "GDLAB_METRIC_WRITER_URI"
# How long an outage of the tracking backend (a server restart, a database failover) is waited out, retrying
# with backoff, before a run's record is given up on (its history.csv keeps everything).
RETRY_ENV, RETRY_SECONDS = "GDLAB_TRACKING_RETRY_SECONDS", 120.0
_TRANSIENT = re.compile(
    r"(?i)max retries exceeded|connection (?:refused|reset|aborted)|could not connect|server closed|"
    r"timed? ?out|temporarily unavailable|database is locked|bad gateway|service unavailable|"
    r"newconnectionerror|remotedisconnected|connection broken|incompleteread|\b50[234]\b"
)  # "connection broken: IncompleteRead": a server that went down mid-response (a retried log-batch is
# idempotent: MLflow's store skips a metric row it already holds, params and tags are set to the same values)


def transient(error: BaseException) -> bool:
    """Whether an error is the backend being away for a while (worth waiting for), not a refusal."""
    return isinstance(error, ConnectionError | TimeoutError) or bool(_TRANSIENT.search(str(error)))


# Callables shown every message of a run's record as it is handed over (gdlab.held_histories), and the rows a
# single run logs itself (gdlab.tracking.MlflowRun.close), as {"run": ID, "metrics": ROWS}.
OBSERVERS: list = []


def observe(message: dict) -> None:
    for observer in OBSERVERS:
        observer(message)


class Outage:
    """Waits out a backend outage: `call` retried with backoff (0.5 s, doubling to 8 s) while its errors are
    transient, for at most `seconds` counted from the outage's first failure; a success ends the outage.
    Past the bound, calls fail at once (no more waiting) until one succeeds."""

    def __init__(self, seconds: float | None = None):
        self.seconds = float(os.environ.get(RETRY_ENV, RETRY_SECONDS)) if seconds is None else seconds
        self.since: float | None = None

    def call(self, call, *args, **kwargs):
        delay = 0.5
        while True:
            try:
                result = call(*args, **kwargs)
            except Exception as error:
                now = time.monotonic()
                self.since = self.since or now
                if not transient(error) or now + delay > self.since + self.seconds:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 8.0)
                continue
            self.since = None
            return result


class WriterGone(RuntimeError):
    """The writer process exited: the caller does the work itself."""


class RemoteError(RuntimeError):
    """A call the writer process ran failed there: its error line."""


class MetricWriter:
    """A child process (`main` below) that writes metrics to MLflow; one per tracking URI.

    Even on the bulk path (gdlab.metric_store) a metric row costs the store 10-40 µs: a dozen rows per
    member per epoch cost as much as the epoch itself, and a thread would still hold the GIL. So the
    writing runs in its own process, on another core; training hands it JSON lines through a feeder thread.
    A plain subprocess (not multiprocessing) so a user's script is never re-imported.
    """

    _instances: dict[str, MetricWriter] = {}

    @classmethod
    def start(cls, uri: str | None) -> None:
        """Start the writer for `uri` now (if tracking is on), so that its imports (MLflow's, ~5 s) overlap
        the command's own instead of delaying the first epochs' rows; unused, it is killed at exit."""
        if uri is not None:
            cls.for_uri(uri)

    @classmethod
    def running(cls, uri: str) -> MetricWriter | None:
        """The writer at work on `uri`, if this process started one and it has not exited."""
        writer = cls._instances.get(uri)
        return writer if writer is not None and writer.process.poll() is None else None

    @classmethod
    def for_uri(cls, uri: str) -> MetricWriter:
        writer = cls._instances.get(uri)
        if writer is None or writer.process.poll() is not None:
            writer = cls._instances[uri] = cls(uri)
        return writer

    def __init__(self, uri: str):
        with held_for_children():  # until it ignores them, even while its interpreter starts
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gdlab.writer_process"],  # the URI (may hold a password): environment
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                env={**os.environ, URI_ENV: uri},
            )  # fmt: skip
        self.used = False
        self.path: str | None = None  # how the writer writes: "bulk" or "log_batch", known after a drain
        self.outbox: queue.Queue = queue.Queue()
        self.replies: queue.Queue | None = None  # every line the writer answers, read by one thread
        self.drains = self.calls = 0  # drains and calls asked: each answer carries its request's number
        self.output_ended = False  # the writer's output is at its end: it exited
        self.rows_sent: set[str] = set()  # the sets of rows (datasets) the writer holds
        self.feeder = threading.Thread(target=self._feed, name="gdlab-metric-feeder", daemon=True)
        self.feeder.start()
        atexit.register(self.close)

    def _feed(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
            except (BrokenPipeError, ValueError, OSError):
                return

    def send(self, message: dict) -> None:
        observe(message)
        self.used = True
        self.outbox.put(message)

    def send_rows(self, key: str, name: str, rows) -> None:
        """A set of rows (`rows()`: [(context, features, targets)], gdlab.run_inputs) sent once under `key`,
        so that {"inputs_of": key} logs them as a run's datasets."""
        if key in self.rows_sent:
            return
        splits = [[context, encode(features), encode(targets)] for context, features, targets in rows()]
        self.send({"rows": {"key": key, "name": name, "splits": splits}})
        self.rows_sent.add(key)

    def submit(self, run_id: str, metrics: list[tuple]) -> None:
        self.send({"run": run_id, "metrics": metrics})

    def drain(self, run_id: str, timeout: float) -> str | None:
        """Wait until everything submitted for `run_id` is written; the first error, if any. The answer is
        the one for this drain: a drain that timed out leaves its answer behind, passed over by the next."""
        self.drains += 1
        number = self.drains
        self.outbox.put({"drain": run_id, "id": number})
        try:
            reply = self._reply(lambda reply: "run" in reply and reply.get("id") == number, timeout)
        except queue.Empty:
            return f"the metric writer did not finish within {timeout:.0f} s"
        except WriterGone:
            return f"the metric writer exited with status {self.process.wait()}"
        self.path = reply["path"]
        return reply["error"]

    def call(self, name: str, timeout: float = 600.0, **kwargs):
        """gdlab.writer_calls.`name`(client, **kwargs) run by the writer process once everything handed to it
        before is written; its result. WriterGone where the writer has exited (the caller may do the work
        itself), RemoteError with the error line where the call failed there, or where it did not answer
        within `timeout` (it may still do it: the caller must not do it again)."""
        if self.process.poll() is not None:
            raise WriterGone(f"the metric writer exited with status {self.process.returncode}")
        self.calls += 1
        number = self.calls
        self.used = True
        self.outbox.put({"call": name, "kwargs": kwargs, "id": number})
        try:
            reply = self._reply(lambda reply: reply.get("reply") == number, timeout)
        except queue.Empty:
            raise RemoteError(f"the metric writer did not answer within {timeout:.0f} s") from None
        if reply["error"] is not None:
            raise RemoteError(reply["error"])
        return reply["result"]

    def _reply(self, wanted, timeout: float) -> dict:
        """The writer's next answer that is `wanted` (one left by a drain that timed out is passed over);
        queue.Empty after `timeout` seconds, WriterGone at the end of its output."""
        if self.replies is None:
            self.replies = queue.Queue()
            threading.Thread(target=self._read_replies, name="gdlab-writer-replies", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            if self.output_ended and self.replies.empty():
                raise WriterGone(f"the metric writer exited with status {self.process.wait()}")
            line = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:  # `output_ended` says so to every later wait
                raise WriterGone(f"the metric writer exited with status {self.process.wait()}")
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:  # not an answer: a library's print on the writer's stdout
                continue
            if isinstance(reply, dict) and wanted(reply):
                return reply

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self.replies.put(line)
        self.output_ended = True
        self.replies.put(None)

    def close(self) -> None:
        if self.process.poll() is None and not self.used:
            self.process.kill()  # never given anything: don't wait for its imports to finish
        if self.process.poll() is None:
            self.outbox.put(None)
            self.feeder.join(timeout=30)
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def encode(array) -> dict:
    """A numpy array as JSON can carry it whole: dtype, shape and base64 bytes (`decode`)."""
    import base64

    import numpy as np

    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(array).decode()}


def decode(array: dict):
    """An array sent by `encode`."""
    import base64

    import numpy as np

    data = base64.b64decode(array["data"])
    return np.frombuffer(data, dtype=np.dtype(array["dtype"])).reshape(array["shape"])
