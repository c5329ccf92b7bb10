"""A tracked population sweep: progress while it trains, every curve in MLflow, each run's own times."""

import csv
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

import warm

BIN = Path(sys.executable).parent
PROGRESS = re.compile(
    r"^trials #0-#7: epoch (\d+)/2000, (\d+) training, (\d+) retired, (\d+) pruned; best val/loss "
)


def read_lines(stream, lines: list) -> None:
    for line in stream:
        lines.append((time.time(), line.rstrip("\n")))


@pytest.mark.slow
def test_population_sweep_shows_progress_and_records_every_epoch_with_its_own_times(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = [str(BIN / "gdlab-sweep"), "lr", "--population", "8", "--budget", "8", "--n-trials", "8",
               "--progress", "0.5", "trainer.max_epochs=2000", "trainer.stop_loss=0.1",
               "--no-refit"]  # fmt: skip
    sweep = warm.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list = []
    reader = threading.Thread(target=read_lines, args=(sweep.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while sum(bool(PROGRESS.match(line)) for _, line in lines) < 2 and time.monotonic() < deadline:
        assert sweep.poll() is None, (
            f"the sweep ended before two progress lines: {lines} {sweep.stderr.read()}"
        )
        time.sleep(0.1)
    progress = [PROGRESS.match(line) for _, line in lines if PROGRESS.match(line)]
    assert len(progress) >= 2 and sweep.poll() is None  # read while it trains
    assert not any("done:" in line for _, line in lines)
    assert 0 < int(progress[0][1]) < int(progress[1][1]) < 2000
    assert [sum(int(m[i]) for i in (2, 3, 4)) for m in progress] == [8] * len(
        progress
    )  # every member counted
    assert sweep.wait(timeout=600) == 0, sweep.stderr.read()
    reader.join(timeout=10)

    trials = optuna.load_study(
        study_name="lr", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    ).trials
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = {}
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        with open(tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / "history.csv") as f:
            history = list(csv.DictReader(f))
        # No curve dropped: every epoch as trained; a loss or accuracy then ends at the trained weights.
        for key in ("train/loss", "test/acc", "grad_norm/layer1"):
            logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            final_key = f"final/{key}"
            final = [(len(history), run.data.metrics[final_key])] if final_key in run.data.metrics else []
            assert [m.step for m in logged] == [int(row["epoch"]) for row in history] + [s for s, _ in final]
            assert [m.value for m in logged] == [float(row[key]) for row in history] + [v for _, v in final]
        assert run.data.metrics["final/val/loss"] == pytest.approx(trial.value)
        assert run.info.status == "FINISHED"
        runs[trial.number] = (len(history), run.info.end_time)
    epochs = sorted(runs.values())
    assert epochs[0][0] < 1000 and epochs[-1][0] == 2000  # some members met stop_loss early
    # Each run ends when its own training did: an early member a second or more before the batch's last one.
    assert epochs[0][1] < epochs[-1][1] - 1000
    # Optuna's plots on the parent: one searched parameter leaves nothing to compare between parameters,
    # and its slice is the report's objective figure; fixed-step GD spends one evaluation an epoch, so loss
    # against evaluations would be the loss curves again
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["gdlab.kind"] == "sweep"
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert plots == {"optimization_history.png"}
    report = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"objective_vs_params.png", "loss_curves.png"} <= report and "loss_vs_evals.png" not in report


@pytest.mark.parametrize("later", [False, True], ids=["waited-for-in-fit", "waited-for-by-the-caller"])
def test_a_population_whose_writer_dies_still_ends_every_run(tmp_path, monkeypatch, later):
    """The writer holds a population's run closings; if it dies, the training process ends the runs: in
    `fit_population`, or where a sweep waits for the records, after telling Optuna (`PendingRecords`)."""
    from gdlab.compose import compose_config
    from gdlab.config import validate
    from gdlab.fit import fit_population
    from gdlab.metric_writer import MetricWriter
    from gdlab.record import PendingRecords
    from gdlab.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [
        "dataset=xor",
        "trainer.max_epochs=40",
        f"tracking.dir={tmp_path / 'mlruns'}",
        "tracking.plots=false",
    ]
    cfgs = [validate(compose_config([*overrides, f"optimizer.lr={lr}"])) for lr in (0.1, 0.5)]
    uri = tracking_uri(cfgs[0])

    def kill_the_writer(row: dict) -> None:
        if row["epoch"] == 20:
            MetricWriter.for_uri(uri).process.kill()

    records = PendingRecords() if later else None
    results = fit_population(cfgs, output_dirs=[tmp_path / "a", tmp_path / "b"],
                             epoch_callbacks=[[kill_the_writer], []], record_later=records)  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    if later:  # the results name their runs at once; the dead writer is found where the caller waits
        assert [r.final["mlflow_run_id"] for r in results] == [run.run_id for _, run in records.pending]
        assert all("tracking_outage" not in r.final for r in results)
        records.finish()
        assert not records.pending
    for result in results:
        assert result.final["tracking_outage"] is None  # the training process wrote what the writer held
        run = client.get_run(result.final["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.end_time is not None
        assert run.data.tags["gdlab.writer"].startswith("died")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(41))  # 40 epochs and the final value: the record is complete
        assert (
            len((tmp_path / Path(result.final["output_dir"]).name / "history.csv").read_text().splitlines())
            == 41
        )
