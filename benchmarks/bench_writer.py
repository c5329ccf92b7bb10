"""Metric rows per second into MLflow's SQLite store: gdlab's writer against a raw executemany, same table.

One history, the shape a population sweep writes (--runs members x --epochs epochs x 9 metrics), goes
into a fresh MLflow store three ways, all in this invocation:
  (raw)       sqlite3 executemany into MLflow's own `metrics` table, one transaction: the store's floor;
  (writer)    gdlab's metric writer process (gdlab.metric_writer, bulk path of gdlab.metric_store),
              fed epoch by epoch as training feeds it, timed from the first row handed over to the last
              run's drain (JSON over the pipe, validation, latest-metric rows, commit all included);
  (log_batch) MlflowClient.log_batch, 1000 rows a call (MLflow's ORM), on --log-batch-runs runs only.
Usage: python benchmarks/bench_writer.py [--runs 64] [--epochs 300] [--log-batch-runs 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
KEYS = ["train/loss", "train/acc", "test/loss", "test/acc", "grad_norm", "grad_norm/layer1",
        "grad_norm/layer2", "loss_after", "evals/total"]  # fmt: skip


def new_store(directory: Path, runs: int) -> tuple[str, list[str]]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bench-writer")
    return uri, [client.create_run(experiment).info.run_id for _ in range(runs)]


def epoch_rows(epoch: int, member: int) -> list[tuple]:
    timestamp = 1_700_000_000_000 + epoch
    return [(key, 1.0 / (epoch + member + i + 1), timestamp, epoch) for i, key in enumerate(KEYS)]


def raw_executemany(directory: Path, runs: int, epochs: int) -> float:
    uri, run_ids = new_store(directory, runs)
    rows = [(key, value, timestamp, run_id, step, 0)
            for p, run_id in enumerate(run_ids) for epoch in range(epochs)
            for key, value, timestamp, step in epoch_rows(epoch, p)]  # fmt: skip
    connection = sqlite3.connect(uri[len("sqlite:///") :])
    started = time.perf_counter()
    with connection:
        connection.executemany(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    seconds = time.perf_counter() - started
    connection.close()
    return len(rows) / seconds


def writer_process(directory: Path, runs: int, epochs: int) -> tuple[float, str]:
    from gdlab.metric_writer import MetricWriter

    uri, run_ids = new_store(directory, runs)
    writer = MetricWriter(uri)
    writer.submit(run_ids[0], epoch_rows(0, 0))  # the writer's own start-up (imports) is left out
    assert writer.drain(run_ids[0], timeout=120) is None
    started, total = time.perf_counter(), 0
    for epoch in range(1, epochs):
        for p, run_id in enumerate(run_ids):
            rows = epoch_rows(epoch, p)
            writer.submit(run_id, rows)
            total += len(rows)
    errors = [writer.drain(run_id, timeout=600) for run_id in run_ids]
    seconds = time.perf_counter() - started
    assert errors == [None] * runs, errors
    writer.close()
    return total / seconds, writer.path


def log_batch(directory: Path, runs: int, epochs: int) -> float:
    from gdlab.metric_store import LogBatchSink
    from gdlab.stores import mlflow_client

    uri, run_ids = new_store(directory, runs)
    sink = LogBatchSink(mlflow_client(uri))
    rows_by_run = {run_id: [row for epoch in range(epochs) for row in epoch_rows(epoch, p)]
                   for p, run_id in enumerate(run_ids)}  # fmt: skip
    started = time.perf_counter()
    assert sink.write(rows_by_run) == {}
    return sum(map(len, rows_by_run.values())) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--log-batch-runs", type=int, default=8)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gdlab-bench-writer-") as root:
        folders = [Path(root) / name for name in ("raw", "writer", "log_batch")]
        for folder in folders:
            folder.mkdir()
        raw = raw_executemany(folders[0], args.runs, args.epochs)
        writer, path = writer_process(folders[1], args.runs, args.epochs)
        orm = log_batch(folders[2], args.log_batch_runs, args.epochs)
    rows = args.runs * args.epochs * len(KEYS)
    print(f"{rows} metric rows ({args.runs} runs x {args.epochs} epochs x {len(KEYS)} metrics) into MLflow's "
          "SQLite store, rows per second:")  # fmt: skip
    print("| path | rows/s | vs raw executemany |\n|---|---:|---:|")
    for label, value in (("raw sqlite3 executemany, one transaction", raw),
                         (f"gdlab metric writer process ({path} path)", writer),
                         (f"MlflowClient.log_batch ({args.log_batch_runs} runs)", orm)):  # fmt: skip
        print(f"| {label} | {value:,.0f} | {value / raw:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "raw": raw, "writer": writer, "writer_path": path, "log_batch": orm}, f,
                      indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
