"""The metric writer process: `python -m gdlab.metric_writer URI`.

Reads JSON lines on stdin: {"run": ID, "metrics": [[key, value, timestamp, step], ...]} to log,
{"drain": ID} to answer with {"run": ID, "written": N, "error": TEXT|null} on stdout once everything
before it is written. Exits at end of input, so it never outlives the training process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def main(uri: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from gdlab.masking import mask_passwords

    client = MlflowClient(tracking_uri=uri)
    written: dict[str, int] = {}
    errors: dict[str, str] = {}
    for line in sys.stdin:
        message = json.loads(line)
        if "drain" in message:
            run_id = message["drain"]
            reply = {"run": run_id, "written": written.pop(run_id, 0), "error": errors.pop(run_id, None)}
            print(json.dumps(reply), flush=True)
            continue
        run_id = message["run"]
        if run_id in errors:  # backend down for this run: its history.csv keeps the rest
            continue
        metrics = [Metric(*fields) for fields in message["metrics"]]
        for i in range(0, len(metrics), MAX_BATCH):
            batch = metrics[i : i + MAX_BATCH]
            try:
                client.log_batch(run_id, metrics=batch)
                written[run_id] = written.get(run_id, 0) + len(batch)
            except Exception as error:  # an outage: the run's local history keeps these values
                errors.setdefault(run_id, mask_passwords(str(error)).splitlines()[0])
                break


if __name__ == "__main__":
    main(sys.argv[1])
