"""Both ends of the metric pipe: `MetricWriter` in the training process, `main` in the writer process.

The writer process is `python -m gdlab.metric_writer`, with the tracking URI in $GDLAB_METRIC_WRITER_URI
(never on a command line: `ps` shows those). It reads JSON lines on stdin:
{"run": ID, "metrics": [[key, value, timestamp, step], ...]} to log, {"drain": ID} to answer with
{"run": ID, "error": TEXT|null} on stdout once everything before it is written. It exits
at end of input, so it never outlives the training process.

Light on purpose (the standard library at import; MLflow only inside `main`): the writer process runs
this module, and the training process imports `MetricWriter` from it (through gdlab.tracking).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import threading

URI_ENV = "GDLAB_METRIC_WRITER_URI"
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MetricWriter:
    """A child process (`main` below) that writes metrics to MLflow; one per tracking URI.

    MLflow's store costs ~70 µs per metric row (SQLAlchemy ORM): a dozen metrics cost as much as a
    whole training epoch of these networks, and a thread would still hold the GIL. So the writing
    runs in its own process, on another core; training hands it JSON lines through a feeder thread.
    A plain subprocess (not multiprocessing) so a user's script is never re-imported.
    """

    _instances: dict[str, MetricWriter] = {}

    @classmethod
    def for_uri(cls, uri: str) -> MetricWriter:
        writer = cls._instances.get(uri)
        if writer is None or writer.process.poll() is not None:
            writer = cls._instances[uri] = cls(uri)
        return writer

    def __init__(self, uri: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gdlab.metric_writer"],  # the URI (it may hold a password) by environment
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, URI_ENV: uri},
        )  # fmt: skip
        self.used = False
        self.outbox: queue.Queue = queue.Queue()
        self.feeder = threading.Thread(target=self._feed, name="gdlab-metric-feeder", daemon=True)
        self.feeder.start()
        atexit.register(self.close)

    def _feed(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
            except (BrokenPipeError, ValueError, OSError):
                return

    def submit(self, run_id: str, metrics: list[tuple]) -> None:
        self.used = True
        self.outbox.put({"run": run_id, "metrics": metrics})

    def drain(self, run_id: str, timeout: float) -> str | None:
        """Wait until everything submitted for `run_id` is written; the first error, if any."""
        self.outbox.put({"drain": run_id})
        replies: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: replies.put(self.process.stdout.readline()), daemon=True)
        reader.start()
        try:
            line = replies.get(timeout=timeout)
        except queue.Empty:
            return f"the metric writer did not finish within {timeout:.0f} s"
        if not line:
            return f"the metric writer exited with status {self.process.wait()}"
        return json.loads(line)["error"]

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


def main(uri: str) -> None:
    """The writer process: log each run's metrics in batches, answer drains, until end of input."""
    # Ctrl-C and SIGTERM reach the whole process group (systemd, docker, SLURM): they are the training
    # process's to handle. The writer writes what it was handed and exits when its input ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from gdlab.masking import mask_passwords

    client = MlflowClient(tracking_uri=uri)
    errors: dict[str, str] = {}
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:  # the training process died mid-message: what came before is written
            break
        if "drain" in message:
            run_id = message["drain"]
            print(json.dumps({"run": run_id, "error": errors.pop(run_id, None)}), flush=True)
            continue
        run_id = message["run"]
        if run_id in errors:  # backend down for this run: its history.csv keeps the rest
            continue
        metrics = [Metric(*fields) for fields in message["metrics"]]
        for i in range(0, len(metrics), MAX_BATCH):
            try:
                client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])
            except Exception as error:  # an outage: the run's local history keeps these values
                errors.setdefault(run_id, mask_passwords(str(error)).splitlines()[0])
                break


if __name__ == "__main__":
    main(os.environ[URI_ENV])
