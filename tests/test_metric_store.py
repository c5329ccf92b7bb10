"""The bulk metric path writes exactly what MLflow's log_batch writes, read back through MLflow's client.

The same history goes into one run through `log_batch` and into another through `BulkMetricStore`, on
a SQLite store and on PostgreSQL; every key's `get_metric_history` and the runs' latest metrics
(`search_runs`) must be identical, NaN, ±inf, duplicates, out-of-order steps and all.
"""

import math
import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import postgres_available
from gdlab.metric_store import BulkMetricStore, LogBatchSink, MetricSink
from gdlab.metric_writer import MetricWriter, transient

KEYS = ["train/loss", "test/acc", "grad_norm/layer1", "step"]


def history(seed: int, epochs: int = 400, start: int = 1_700_000_000_000) -> list[tuple]:
    """(key, value, timestamp, step) rows with every case the stores treat specially."""
    rng = random.Random(seed)
    rows = []
    for epoch in range(epochs):
        for key in KEYS:
            rows.append((key, rng.uniform(-2, 2), start + 7 * epoch, epoch))
    rows += [
        ("train/loss", math.nan, start + 5000, epochs),  # NaN at the last step: NaN is the latest value
        ("test/acc", math.inf, start + 5000, 3),  # inf, stored as max float
        ("test/acc", -math.inf, start + 5001, 3),
        ("grad_norm/layer1", 0.5, start + 9, 2),  # an older step logged late: not the latest
        ("grad_norm/layer1", 0.5, start + 9, 2),  # an exact duplicate: written once
        ("step", 1.0, start + 7 * (epochs - 1), epochs - 1),  # same step and time as a row, larger value
        ("nan_only", math.nan, start, 0),
        ("big_step", 1.0, start, 2**40),
    ]
    return rows


def new_run(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name("equality") or client.get_experiment(
        client.create_experiment("equality")
    )
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def read_back(client: MlflowClient, run_id: str) -> tuple[dict, dict]:
    histories = {}
    for key in [*KEYS, "nan_only", "big_step"]:
        rows = client.get_metric_history(run_id, key)
        histories[key] = sorted((m.step, m.timestamp, m.value) for m in rows)
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs([experiment], filter_string=f"attributes.run_id = '{run_id}'")
    return histories, found[0].data.metrics


def assert_equal_records(client: MlflowClient, by_log_batch: str, by_bulk: str) -> None:
    histories_a, latest_a = read_back(client, by_log_batch)
    histories_b, latest_b = read_back(client, by_bulk)
    for key, rows in histories_a.items():
        assert len(rows) == len(histories_b[key]), key
        for (sa, ta, va), (sb, tb, vb) in zip(rows, histories_b[key], strict=True):
            assert (sa, ta) == (sb, tb) and same(va, vb), (key, sa, va, vb)
    assert latest_a.keys() == latest_b.keys()
    for key in latest_a:
        assert same(latest_a[key], latest_b[key]), (key, latest_a[key], latest_b[key])


def check_store(uri: str) -> None:
    client = MlflowClient(tracking_uri=uri)
    bulk = BulkMetricStore.open(client)
    assert bulk is not None, "the bulk path should be verified for this MLflow's schema"
    rows = history(seed=1)
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2 :]  # two flushes: latest rows are updated
    a, b = new_run(client, "log_batch"), new_run(client, "bulk")
    LogBatchSink(client).write({a: first})
    LogBatchSink(client).write({a: second})
    bulk.write({b: first})
    bulk.write({b: second})
    assert_equal_records(client, a, b)
    histories, latest = read_back(client, b)
    assert len(histories["test/acc"]) == 400 + 2 and len(histories["grad_norm/layer1"]) == 400 + 1
    assert math.isnan(latest["train/loss"]) and latest["big_step"] == 1.0
    assert max(v for _, _, v in histories["test/acc"]) == pytest.approx(1.7976931348623157e308)


def test_bulk_path_equals_log_batch_on_sqlite(tmp_path):
    check_store(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
@pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL at :5432")
def test_bulk_path_equals_log_batch_on_postgresql(make_database):
    check_store(f"postgresql+psycopg://postgres@127.0.0.1:5432/{make_database()}")


def test_a_refused_run_falls_back_to_log_batch_and_only_it_fails(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    alive, deleted = new_run(client, "alive"), new_run(client, "deleted")
    client.delete_run(deleted)
    errors = MetricSink(client, uri).write({alive: history(2, epochs=5), deleted: history(3, epochs=5)})
    assert list(errors) == [deleted] and "active" in str(errors[deleted])
    assert len(client.get_metric_history(alive, "train/loss")) == 6


def test_the_writer_process_writes_many_runs_through_the_bulk_path(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = [new_run(client, f"member-{p}") for p in range(8)]
    writer = MetricWriter(uri)
    for epoch in range(300):
        for p, run_id in enumerate(runs):
            writer.submit(run_id, [("train/loss", 1.0 / (epoch + 1 + p), 1_700_000_000_000 + epoch, epoch)])
    dataset = {"name": "moons-n500-noise0.2-rs42", "digest": "0123abcd", "source_type": "code",
               "source": '{"mlflow.source.name": "gdlab.data"}', "context": "train"}  # fmt: skip
    writer.send({"run": runs[0], "inputs": [dataset]})
    assert [writer.drain(run_id, timeout=120) for run_id in runs] == [None] * 8
    # Light: logging datasets never brought torch into the writer (2.7 s of its start, while epochs wait).
    libraries = Path(f"/proc/{writer.process.pid}/maps").read_text()
    writer.close()
    assert writer.path == "bulk"
    assert "sqlite3" in libraries and "libtorch" not in libraries  # the store's library, not torch's
    (logged,) = client.get_run(runs[0]).inputs.dataset_inputs
    assert (logged.dataset.digest, logged.tags[0].value) == ("0123abcd", "train")
    for p, run_id in enumerate(runs):
        values = [
            m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
        ]
        assert values == [1.0 / (epoch + 1 + p) for epoch in range(300)]
        assert client.get_run(run_id).data.metrics["train/loss"] == 1.0 / (300 + p)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_histories_read_in_bulk_equal_get_metric_history(tmp_path, make_database, backend):
    """The report's one-query read of many runs' curves gives what get_metric_history gives, NaN and all."""
    from gdlab.metric_store import read_metric_histories

    if backend == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL at :5432")
    uri = (f"sqlite:///{tmp_path / 'mlflow.db'}" if backend == "sqlite"
           else f"postgresql+psycopg://postgres@127.0.0.1:5432/{make_database()}")  # fmt: skip
    client = MlflowClient(uri)
    runs = [new_run(client, f"run-{i}") for i in range(3)]
    for seed, run_id in enumerate(runs):
        LogBatchSink(client).write({run_id: history(seed, epochs=50)})
    keys = [*KEYS, "nan_only", "big_step"]
    bulk = read_metric_histories(client, runs, keys, chunk=2)  # two queries: chunks of two runs
    for run_id in runs:
        for key in keys:
            expected = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
            got = sorted(bulk[run_id, key])
            assert len(got) == len(expected) and all(
                g[:2] == e[:2] and same(g[2], e[2]) for g, e in zip(got, expected, strict=True)
            ), (run_id, key)


def test_the_writer_ends_many_runs_together_and_a_refused_one_alone(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = [new_run(client, f"member-{p}") for p in range(6)]
    client.delete_run(runs[2])
    writer = MetricWriter(uri)
    statuses = ["FINISHED", "FAILED", "FINISHED", "KILLED", "FINISHED", "FINISHED"]
    for p, (run_id, status) in enumerate(zip(runs, statuses, strict=True)):
        writer.send({"run": run_id, "end": status, "end_time": 1_700_000_000_000 + p})
    errors = [writer.drain(run_id, timeout=120) for run_id in runs]
    writer.close()
    assert [error is not None for error in errors] == [False, False, True, False, False, False]
    assert "active" in errors[2]
    ended = [client.get_run(run_id).info for run_id in runs]
    assert [info.status for info in ended] == [
        "FINISHED",
        "FAILED",
        "RUNNING",
        "KILLED",
        "FINISHED",
        "FINISHED",
    ]
    assert [info.end_time for info in ended if info.status != "RUNNING"] == [
        1_700_000_000_000 + p for p in (0, 1, 3, 4, 5)
    ]


def test_a_server_going_down_mid_response_is_an_outage_to_wait_out_and_a_refusal_is_not():
    """What MLflow's REST client said when the tracking server was restarted mid-request (seen in CI), against
    what it says when the server refuses a request."""
    broken = ("API request to http://127.0.0.1:56925/api/2.0/mlflow/runs/log-batch failed with exception "
              "('Connection broken: IncompleteRead(0 bytes read, 2 more expected)', IncompleteRead(0 bytes "
              "read, 2 more expected))")  # fmt: skip
    refused = ("INVALID_PARAMETER_VALUE: Changing param values is not allowed. Param with key='lr' was "
               "already logged")  # fmt: skip
    assert transient(RuntimeError(broken))
    assert not transient(RuntimeError(refused))


def test_a_drain_that_timed_out_leaves_its_answer_to_no_later_drain(tmp_path):
    """A drain that gives up (the writer still importing) must not lend its late answer to the next drain:
    that one returns once everything handed over before it is written, with its own run's error."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    refused, alive = new_run(client, "refused"), new_run(client, "alive")
    client.delete_run(refused)
    writer = MetricWriter(uri)
    writer.submit(refused, [("train/loss", 1.0, 1_700_000_000_000, 0)])
    assert "did not finish" in writer.drain(refused, timeout=0)  # the writer is still importing MLflow
    assert writer.drain(refused, timeout=0) is not None  # nor now: two answers are left behind
    rows = [("train/loss", 0.5 * epoch, 1_700_000_000_000 + epoch, epoch) for epoch in range(50)]
    writer.submit(alive, rows)
    assert writer.drain(alive, timeout=120) is None  # its own answer, not the refused run's
    # ... given once its rows were written: read by another client, they are all there
    assert len(MlflowClient(tracking_uri=uri).get_metric_history(alive, "train/loss")) == 50
    writer.submit(refused, [("train/loss", 2.0, 1_700_000_000_000, 1)])
    second = writer.drain(refused, timeout=120)  # reported once, at the first drain that came through
    writer.close()
    assert "active" in second  # refused again: its own error, at its own drain
