"""The curves a sweep's report takes from what its process handed MLflow (gdlab.held_histories) are the
curves MLflow's own client reads back from the store, point for point."""

from __future__ import annotations

import math
import signal

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import gdlab
from gdlab import held_histories, metric_store
from gdlab.report.runs import load_run, read_histories

pytestmark = pytest.mark.usefixtures("clean_tracking_env")


@pytest.fixture
def holding():
    held_histories.keep()
    yield
    held_histories.drop()


def test_held_curves_are_the_curves_mlflow_reads_back(tmp_path, holding):
    """Every way a run's rows are handed over: a population's column blocks (flushed every epoch, with a
    member on a schedule and a member that diverges and retires), a single run logged through the writer,
    and a short single run that logs its rows itself."""
    common = ["dataset=moons", "trainer.max_epochs=30", f"tracking.dir={tmp_path}"]
    members = [
        {"optimizer.lr": 0.5, "optimizer.lr_schedule": [[0, 0.5], [10, 0.2], [20, 0.05]]},
        {"optimizer.lr": 1e30},  # diverges
        {"optimizer.lr": 0.1},
    ]
    population = gdlab.run([*common, "tracking.flush_seconds=0"], population=members)
    through_writer = gdlab.run([*common, "tracking.flush_seconds=0", "seed=3"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [client.get_run(r.final["mlflow_run_id"]) for r in [*population, through_writer]]

    histories, covered = read_histories(client, runs)
    assert covered == {run.info.run_id for run in runs} == held_histories.held_runs(list(covered))
    assert all(isinstance(curve, pd.Series) for curve in histories.values())
    compared = 0
    for run in runs:
        held, stored = load_run(client, run, histories), load_run(client, run, None)  # get_metric_history
        pd.testing.assert_frame_equal(held.curves, stored.curves, check_exact=True)
        compared += int(held.curves.notna().sum().sum())
    assert compared > 5 * 30
    schedule = histories[(runs[0].info.run_id, "hp/optimizer.lr")]
    assert [schedule[0], schedule[10], schedule[29]] == [0.5, 0.2, 0.05]

    # A store of its own: its writer has been given nothing, so this short run logs its rows itself.
    short = gdlab.run(["dataset=xor", "trainer.max_epochs=5", f"tracking.dir={tmp_path / 'single'}"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'single' / 'mlflow.db'}")
    run = client.get_run(short.final["mlflow_run_id"])
    assert run.data.tags.get("gdlab.writer") is None and "train/loss" in run.data.metrics
    histories, covered = read_histories(client, [run])
    assert covered == held_histories.held_runs([run.info.run_id]) == {run.info.run_id}
    held, stored = load_run(client, run, histories).curves, load_run(client, run, None).curves
    pd.testing.assert_frame_equal(held, stored, check_exact=True)
    assert len(held) == 6  # epochs 0..5, the last at the trained weights


def test_infinities_nans_and_a_step_logged_twice_are_held_as_the_store_keeps_them(tmp_path, holding):
    from gdlab.metric_writer import MetricWriter, encode
    from gdlab.stores import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    run_id = client.create_run(client.create_experiment("edges")).info.run_id
    writer = MetricWriter(uri)
    writer.send({"run": run_id, "metrics": [
        ["train/loss", math.inf, 1000, 0], ["train/loss", -math.inf, 1000, 1],
        ["train/loss", math.nan, 1000, 2], ["train/loss", 1.0, 1000, 3],
        ["train/loss", 2.0, 2000, 3], ["train/loss", 3.0, 1500, 3],
    ]})  # fmt: skip
    steps, values = np.array([[0], [1], [1]]), np.array([[[math.inf]], [[0.25]], [[0.5]]])
    writer.send({"columns": {"runs": [run_id], "keys": ["train/acc"], "timestamps": [1000, 1000, 3000],
                             "steps": encode(steps), "values": encode(values)}})  # fmt: skip
    assert writer.drain(run_id, timeout=120) is None
    writer.close()
    run = client.get_run(run_id)
    histories, covered = read_histories(client, [run])
    assert covered == {run_id}
    held = load_run(client, run, histories).curves
    pd.testing.assert_frame_equal(held, load_run(client, run, None).curves, check_exact=True)
    assert held["train/loss"].tolist()[:2] == [metric_store.MAX_FLOAT, -metric_store.MAX_FLOAT]
    assert math.isnan(held["train/loss"][2]) and held["train/loss"][3] == 2.0  # the latest row of step 3
    assert held["train/acc"].dropna().tolist() == [metric_store.MAX_FLOAT, 0.5]


def test_a_run_whose_record_had_an_outage_is_read_back_from_the_store(tmp_path, holding):
    result = gdlab.run(["dataset=xor", "trainer.max_epochs=5", f"tracking.dir={tmp_path}"])
    run_id = result.final["mlflow_run_id"]
    assert held_histories.held_runs([run_id]) == {run_id}
    held_histories.forget(run_id)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    histories, covered = read_histories(client, [client.get_run(run_id)])
    assert covered == {run_id} and not any(isinstance(curve, pd.Series) for curve in histories.values())


def test_past_its_budget_nothing_is_held_and_every_curve_is_read_back(tmp_path, holding, monkeypatch):
    monkeypatch.setattr(held_histories, "MAX_HELD_BYTES", 10_000)
    common = [
        "dataset=moons",
        "trainer.max_epochs=50",
        f"tracking.dir={tmp_path}",
        "tracking.flush_seconds=0",
    ]
    results = gdlab.run(common, population=[{"optimizer.lr": 0.1}, {"optimizer.lr": 0.2}])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [client.get_run(r.final["mlflow_run_id"]) for r in results]
    assert held_histories.held_runs([run.info.run_id for run in runs]) == set()
    histories, covered = read_histories(client, runs)  # from the store, in one query
    assert covered == {run.info.run_id for run in runs}
    assert not any(isinstance(curve, pd.Series) for curve in histories.values())
    assert len(load_run(client, runs[0], histories).curves) == 51


def test_a_sweep_report_draws_its_own_trials_without_reading_them_back(tmp_path, monkeypatch):
    """gdlab-sweep's report reads no history of its trials from the store, and its tables are those
    gdlab-report makes afterwards from what the store holds."""
    from gdlab.report.build import main as report_main
    from gdlab.sweep import cli

    asked: list[str] = []
    read = metric_store.read_metric_histories

    def reading(client, run_ids, keys, *args):
        asked.extend(run_ids)
        return read(client, run_ids, keys, *args)

    monkeypatch.setattr(metric_store, "read_metric_histories", reading)
    monkeypatch.chdir(tmp_path)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = cli.main(
            ["lr", "trainer.max_epochs=40", "--n-trials", "4", "--population", "4", "--progress", "0"]
        )
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert code == 0 and asked == []
    (sweep_report,) = (tmp_path / "outputs" / "sweeps" / "lr").glob("report-*")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-lr").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`gdlab.kind` = 'sweep'")
    uri = client.tracking_uri
    assert (
        report_main([parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "again"), "--no-log"])
        == 0
    )
    assert len(asked) == 5  # the four trials and the refit, read back by gdlab-report
    for table in ("epoch_table.csv", "final_metrics.csv"):
        assert (sweep_report / table).read_text() == (tmp_path / "again" / table).read_text()
