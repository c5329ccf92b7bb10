"""The writer process's side of the metric pipe (gdlab.metric_writer's protocol): `main` reads the training
process's messages and writes them, one go at a time, and answers its drains and calls
(gdlab.writer_calls). Run as `python -m gdlab.writer_process` by gdlab.metric_writer.MetricWriter, with the
tracking URI in its environment.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading

from gdlab import import_gc
from gdlab.interrupts import ignore_here
from gdlab.metric_writer import URI_ENV, Outage, decode, transient

REPLIES = sys.stdout  # where the writer process answers drains and calls (`main`)

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
    global REPLIES
    REPLIES, sys.stdout = sys.stdout, sys.stderr  # stdout carries the answers: what libraries print, stderr
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # noqa: F401

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
    client = writer_client(uri)
    try:
        sink = MetricSink(client, uri)
    except Exception as error:  # the store could not be opened: every run's rows meet why
        sink = Unwritable(error)
    writer = RunWriter(client, sink)
    writer.write(messages)
    while not ended:
        messages, ended = take_messages(inbox)
        writer.write(messages)


def writer_client(uri: str):
    """The client on `uri`, opened as gdlab.stores opens one (a new store made under its lock, a database
    probed, runs of dead processes repaired): the writer may be the first to open the store (its calls make
    the sweep's runs). Where that fails (a corrupt file, an unreachable server), `Unopened`."""
    from gdlab.stores import mlflow_client

    try:
        return mlflow_client(uri)
    except Exception as error:
        return Unopened(error)


class Unopened:
    """A store that could not be opened: every use raises why, so each message meets the error (a call's
    caller says it in one line, a run's drain reports it), none a traceback."""

    def __init__(self, error: Exception):
        self.error = error

    def __getattr__(self, name: str):
        raise self.error


class Unwritable:
    """The sink of a store that could not be opened: every run's rows fail with why."""

    path = "log_batch"

    def __init__(self, error: Exception):
        self.error = error

    def write(self, rows_by_run: dict) -> dict:
        return dict.fromkeys(rows_by_run, self.error)


class RunWriter:
    """What the writer process does with a group of messages, in an order that keeps each run's sense:
    params, then every metric row (one go), then tags, artifacts and closing statuses, then drain replies."""

    def __init__(self, client, sink):
        self.client, self.sink = client, sink
        self.errors: dict[str, str] = {}  # run -> its first error, until its drain reports it
        self.outage = Outage()
        self.rows: dict[str, dict] = {}  # sets of rows sent ({"rows": ...}), until their datasets are made
        self.datasets: dict[str, list[dict]] = {}  # key -> its datasets (gdlab.dataset_entities)

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
            elif "rows" in message:
                self.rows[message["rows"]["key"]] = message["rows"]
            elif "inputs_of" in message:
                self.attempt(run_id, self.log_inputs_of, run_id, message["inputs_of"])
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
                print(json.dumps(reply), file=REPLIES, flush=True)
            elif "call" in message:
                self.end(ends)
                ends = []
                self.answer(message)
        self.end(ends)

    def answer(self, message: dict) -> None:
        """Run a call (gdlab.writer_calls) and print its reply."""
        from gdlab import writer_calls
        from gdlab.masking import error_line

        try:
            result, error = getattr(writer_calls, message["call"])(self.client, **message["kwargs"]), None
        except Exception as failure:  # the caller decides what it means (a refused run, an outage)
            result, error = None, error_line(failure)
        print(
            json.dumps({"reply": message["id"], "result": result, "error": error}), file=REPLIES, flush=True
        )

    def log_inputs_of(self, run_id: str, key: str) -> None:
        """Log the datasets of the rows sent under `key` ({"rows": ...}) as the run's inputs; made once."""
        from gdlab.dataset_entities import dataset_dicts, dataset_inputs

        if key not in self.datasets:
            rows = self.rows[key]
            splits = [
                (context, decode(features), decode(targets)) for context, features, targets in rows["splits"]
            ]
            self.datasets[key] = dataset_dicts(rows["name"], splits)
            del self.rows[key]  # made (not before: a failure here is met again by the next run of these rows)
        self.client.log_inputs(run_id, dataset_inputs(self.datasets[key]))

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
