"""Both ends of the metric pipe: `MetricWriter` in the training process, `main` in the writer process.

The writer process is `python -m gdlab.metric_writer`, with the tracking URI in $GDLAB_METRIC_WRITER_URI
(never on a command line: `ps` shows those). It reads JSON lines on stdin, to log:
  {"run": ID, "metrics": [[key, value, timestamp, step], ...]}, {"run": ID, "params": [[key, value], ...]},
  {"run": ID, "tags": [[key, value], ...]}, {"run": ID, "artifacts": FOLDER},
  {"run": ID, "inputs": [DATASET, ...]} (gdlab.run_inputs: MLflow's Dataset.to_dict() and its context),
  {"run": ID, "end": STATUS, "end_time": MS};
  {"columns": {"runs": [ID, ...], "keys": [KEY, ...], "timestamps": [MS per epoch],
  "steps": ARRAY (epochs, runs), "values": ARRAY (epochs, keys, runs)}}: a population's epochs in bulk
  (gdlab.run_epochs), one row per value that is not NaN, ARRAY being {"dtype", "shape", "data": base64};
and {"drain": ID, "id": N}, answered with {"run": ID, "id": N, "error": TEXT|null, "path": "bulk"|"log_batch"}
on stdout once everything before it is written. Whatever has arrived is written in one go (gdlab.metric_store:
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

from gdlab import import_gc
from gdlab.interrupts import held_for_children, ignore_here

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
    def for_uri(cls, uri: str) -> MetricWriter:
        writer = cls._instances.get(uri)
        if writer is None or writer.process.poll() is not None:
            writer = cls._instances[uri] = cls(uri)
        return writer

    def __init__(self, uri: str):
        with held_for_children():  # until it ignores them, even while its interpreter starts
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gdlab.metric_writer"],  # the URI (may hold a password): environment
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                env={**os.environ, URI_ENV: uri},
            )  # fmt: skip
        self.used = False
        self.path: str | None = None  # how the writer writes: "bulk" or "log_batch", known after a drain
        self.outbox: queue.Queue = queue.Queue()
        self.replies: queue.Queue | None = None  # the writer's answers to drains, read by one thread
        self.drains = 0  # drains asked: each answer carries its drain's number
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

    def submit(self, run_id: str, metrics: list[tuple]) -> None:
        self.send({"run": run_id, "metrics": metrics})

    def drain(self, run_id: str, timeout: float) -> str | None:
        """Wait until everything submitted for `run_id` is written; the first error, if any. The answer is
        the one for `run_id`: a drain that timed out leaves its answer behind, passed over by the next."""
        self.drains += 1
        number = self.drains
        self.outbox.put({"drain": run_id, "id": number})
        if self.replies is None:  # one reader for the writer's whole output
            self.replies = queue.Queue()
            threading.Thread(target=self._read_replies, name="gdlab-writer-replies", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return f"the metric writer did not finish within {timeout:.0f} s"
            if line is None:
                self.replies.put(None)  # for every later drain
                return f"the metric writer exited with status {self.process.wait()}"
            reply = json.loads(line)
            if reply.get("id") == number:
                self.path = reply["path"]
                return reply["error"]

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self.replies.put(line)
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


# Rows written in one go (one transaction on the bulk path): ~0.3 s of SQLite's time, so other processes
# writing the same store (workers creating runs, the sweep's parent run) wait well within SQLite's timeout.
MAX_ROWS = 20_000


def read_messages(stream, inbox: queue.Queue) -> None:
    """Parse stdin's JSON lines into `inbox`; None at end of input."""
    for line in stream:
        try:
            inbox.put(json.loads(line))
        except json.JSONDecodeError:  # the training process died mid-message: what came before is written
            break
    inbox.put(None)


def take_messages(inbox: queue.Queue) -> tuple[list[dict], bool]:
    """(the messages waiting now, at least one, up to MAX_ROWS rows; whether input has ended)."""
    messages, rows = [], 0
    message = inbox.get()
    while message is not None:
        messages.append(message)
        rows += len(message.get("metrics", ()))
        if rows >= MAX_ROWS:
            return messages, False
        try:
            message = inbox.get_nowait()
        except queue.Empty:
            return messages, False
    return messages, True


def main(uri: str) -> None:
    """The writer process: take what has arrived, write it in one go, answer its drains; until input ends."""
    # Ctrl-C and SIGTERM reach the whole process group (systemd, docker, SLURM): they are the training
    # process's to handle. The writer writes what it was handed and exits when its input ends.
    ignore_here()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    if uri.partition(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 (its ~1.5 s of imports, before any message)
    from gdlab.metric_store import MetricSink

    import_gc.resume()

    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_messages, args=(sys.stdin, inbox), daemon=True).start()
    # The store is opened at the first message, not before: a writer started early (MetricWriter.start)
    # imports while the command does, and a new store is still being made then (gdlab.stores).
    messages, ended = take_messages(inbox)
    if not messages:  # started early, never used
        return
    client = MlflowClient(tracking_uri=uri)
    writer = RunWriter(client, MetricSink(client, uri))
    writer.write(messages)
    while not ended:
        messages, ended = take_messages(inbox)
        writer.write(messages)


class RunWriter:
    """What the writer process does with a group of messages, in an order that keeps each run's sense:
    params, then every metric row (one go), then tags, artifacts and closing statuses, then drain replies."""

    def __init__(self, client, sink):
        self.client, self.sink = client, sink
        self.errors: dict[str, str] = {}  # run -> its first error, until its drain reports it
        self.outage = Outage()

    def attempt(self, run_id: str, call, *args, **kwargs) -> None:
        from gdlab.masking import error_line

        try:
            self.outage.call(call, *args, **kwargs)
        except Exception as error:  # a refused run, or an outage past its bound: reported at the run's drain
            self.errors.setdefault(run_id, error_line(error))

    def write_rows(self, rows_by_run: dict[str, list]) -> None:
        """Every run's metric rows in one go; those of runs that failed for a while (an outage) again."""

        from gdlab.masking import error_line

        pending = dict(rows_by_run)

        def write() -> None:
            failed = self.sink.write(pending)
            for run_id in [run for run in pending if run not in failed]:
                del pending[run_id]  # written: not again
            for run_id, error in list(failed.items()):
                if not transient(error):  # a refused run: reported at its drain
                    self.errors.setdefault(run_id, error_line(error))
                    del pending[run_id]
            if pending:  # the backend is away: Outage waits, then the rest is written again
                raise ConnectionError(str(next(iter(failed.values()))))

        try:
            self.outage.call(write)
        except Exception as error:  # the outage outlasted its bound: those runs' writing stops here
            for run_id in pending:
                self.errors.setdefault(run_id, error_line(error))

    def write(self, messages: list[dict]) -> None:
        from mlflow.entities import RunTag

        from gdlab.metric_store import log_params

        rows_by_run: dict[str, list] = {}
        for message in messages:
            run_id = message.get("run")
            if "params" in message:
                self.attempt(run_id, log_params, self.client, run_id, message["params"])
            # a run whose writing failed is not written again: its history.csv keeps the rest
            elif "metrics" in message and run_id not in self.errors:
                rows_by_run.setdefault(run_id, []).extend(message["metrics"])
            elif "columns" in message:
                for run_id, rows in column_rows(message["columns"]).items():
                    if run_id not in self.errors:
                        rows_by_run.setdefault(run_id, []).extend(rows)
        self.write_rows(rows_by_run)
        ends: list[tuple[str, str, int]] = []
        artifact_uris = self.artifact_uris([m["run"] for m in messages if "artifacts" in m])
        for message in messages:
            run_id = message.get("run")
            if "tags" in message:
                tags = [RunTag(key, value) for key, value in message["tags"]]
                self.attempt(run_id, self.client.log_batch, run_id, tags=tags)
            elif "inputs" in message:
                from gdlab.dataset_entities import dataset_inputs

                self.attempt(run_id, self.client.log_inputs, run_id, dataset_inputs(message["inputs"]))
            elif "artifacts" in message and run_id in artifact_uris:
                self.attempt(
                    run_id, log_artifacts_at, artifact_uris[run_id], self.client, message["artifacts"]
                )
            elif "artifacts" in message:
                self.attempt(run_id, self.client.log_artifacts, run_id, message["artifacts"])
            elif "end" in message:
                ends.append((run_id, message["end"], message["end_time"]))
            elif "drain" in message:
                self.end(ends)
                ends = []
                run_id = message["drain"]
                reply = {"run": run_id, "id": message.get("id"), "error": self.errors.pop(run_id, None),
                         "path": self.sink.path}  # fmt: skip
                print(json.dumps(reply), flush=True)
        self.end(ends)

    def artifact_uris(self, run_ids: list[str]) -> dict[str, str]:
        """Where these runs' artifacts go, read in one query where the store allows (gdlab.run_store); {}
        otherwise, or on any error: then `client.log_artifacts` asks the store run by run."""
        from gdlab.run_store import artifact_uris

        if len(run_ids) < 2:
            return {}
        try:
            return artifact_uris(self.client, run_ids) or {}
        except Exception:
            return {}

    def end(self, ends: list[tuple[str, str, int]]) -> None:
        """End runs (run id, status, end time): all in one transaction where the store allows
        (gdlab.run_store.end_runs), else, or if that fails, each by `set_terminated`. Tried even after a run's
        error: a run must not stay RUNNING."""
        from gdlab.run_store import end_runs

        try:
            if ends and self.outage.call(end_runs, self.client, ends):
                return
        except Exception:
            pass  # each run below gets MLflow's own error, and the others are ended
        for run_id, status, end_time in ends:
            self.attempt(run_id, self.client.set_terminated, run_id, status=status, end_time=end_time)


def log_artifacts_at(artifact_uri: str, client, folder: str) -> None:
    """`client.log_artifacts(run_id, folder)` for a run whose artifact URI is known: the repository MLflow's
    client would resolve for it (`TrackingServiceClient._get_artifact_repo`), without asking the store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

    uri = add_databricks_profile_info_to_artifact_uri(artifact_uri, client.tracking_uri)
    get_artifact_repository(uri, tracking_uri=client.tracking_uri).log_artifacts(folder)


def decode(array: dict):
    """An array sent by gdlab.run_epochs.encode."""
    import base64

    import numpy as np

    data = base64.b64decode(array["data"])
    return np.frombuffer(data, dtype=np.dtype(array["dtype"])).reshape(array["shape"])


def column_rows(columns: dict) -> dict[str, list[tuple]]:
    """A "columns" message as each run's rows (key, value, timestamp, step), in step order."""
    import numpy as np

    steps, values = decode(columns["steps"]), decode(columns["values"])
    keys, timestamps = (
        np.array(columns["keys"], dtype=object),
        np.array(columns["timestamps"], dtype=np.int64),
    )
    rows: dict[str, list[tuple]] = {}
    for j, run_id in enumerate(columns["runs"]):
        epoch, key = np.nonzero(~np.isnan(values[:, :, j]))
        if len(epoch):
            fields = (keys[key], values[epoch, key, j], timestamps[epoch], steps[epoch, j])
            rows[run_id] = list(zip(*(field.tolist() for field in fields), strict=True))
    return rows


def _raise(error: Exception) -> None:
    raise error


if __name__ == "__main__":
    from gdlab.process_exit import exit_now

    import_gc.pause()  # while MLflow is imported (gdlab.import_gc)

    exit_now(lambda: main(os.environ[URI_ENV]))  # everything is written once main returns
