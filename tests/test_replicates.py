"""Replicates and k-fold cross-validation: a configuration trained with seeds seed, seed+1, ..., and on
k folds, as members of one population; each member as if it trained alone."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from scipy import stats

import gdlab
import warm
from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.data import split_rows
from gdlab.replicates import aggregate, summarize

MOONS = ["dataset=moons", "dataset.n_samples=120", "dataset.val_size=0.25", "model.depth=2", "model.width=6",
         "objective=val/loss", "trainer.max_epochs=25", "tracking=none"]  # fmt: skip
MODES = {
    "gd": ["optimizer=gd", "optimizer.lr=0.5"],
    "gd manual": ["optimizer=gd", "optimizer.lr=0.5", "backprop=manual"],
    "armijo forward": ["optimizer=backtracking", "optimizer.lr=1.0"],
    "armijo forward_backward manual": [
        "optimizer=backtracking",
        "optimizer.lr=1.0",
        "backprop=manual",
        "optimizer.trial_eval=forward_backward",
    ],  # fmt: skip
    "adam": ["optimizer=adam", "optimizer.lr=0.01"],
    "adam manual": ["optimizer=adam", "optimizer.lr=0.01", "backprop=manual"],
    "sgd mini-batches": ["optimizer=sgd", "optimizer.lr=0.1", "optimizer.batch_size=16"],  # trained apart
}
COMPARED = ["train/loss", "train/acc", "val/loss", "test/loss", "grad_norm", "step", "evals/total"]


@pytest.mark.parametrize("mode", MODES)
def test_a_replicate_equals_its_seed_trained_alone(mode):
    overrides = [*MOONS, *MODES[mode], "seed=7"]
    replicated = gdlab.run(overrides, replicates=3)
    assert replicated.seeds == [7, 8, 9]
    for seed, run in zip(replicated.seeds, replicated.runs, strict=True):
        alone = gdlab.run([*overrides, f"seed={seed}"])
        assert len(run.history) == len(alone.history) == 25
        for column in COMPARED:
            np.testing.assert_allclose(run.history[column], alone.history[column], rtol=0, atol=1e-8,
                                       err_msg=f"{mode} seed {seed} {column}")  # fmt: skip
        assert run.final["objective"] == pytest.approx(alone.final["objective"], abs=1e-8)
    assert len(set(replicated.values)) == 3  # the seeds do differ
    assert replicated.mean == pytest.approx(np.mean(replicated.values))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(replicated.values), scale=stats.sem(replicated.values))
    assert replicated.interval == pytest.approx((low, high))


def test_a_population_of_configurations_each_replicated():
    population = [{"optimizer.lr": 0.1}, {"optimizer.lr": 1.0}]
    results = gdlab.run([*MOONS, *MODES["gd"], "seed=3"], population=population, replicates=2)
    assert [r.seeds for r in results] == [[3, 4], [3, 4]]
    for member, replicated in zip(population, results, strict=True):
        for seed, run in zip(replicated.seeds, replicated.runs, strict=True):
            alone = gdlab.run(
                [*MOONS, *MODES["gd"], f"optimizer.lr={member['optimizer.lr']}", f"seed={seed}"]
            )
            assert run.final["objective"] == pytest.approx(alone.final["objective"], abs=1e-8)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_replicates_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=f"replicates={value!r} must be an integer >= 1"):
        gdlab.run(MOONS, replicates=value)


def test_aggregates_and_their_summary():
    values = [0.3, 0.1, 0.2, 0.9]
    assert aggregate(values, "mean", "minimize") == pytest.approx(0.375)
    assert aggregate(values, "median", "minimize") == pytest.approx(0.25)
    assert aggregate(values, "worst", "minimize") == 0.9
    assert aggregate(values, "worst", "maximize") == 0.1
    assert math.isnan(aggregate([0.1, math.nan], "median", "minimize"))  # a diverged replicate: no value
    summary = summarize(values)
    assert summary.std == pytest.approx(np.std(values, ddof=1))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (summary.low, summary.high) == pytest.approx((low, high))
    assert math.isnan(summarize([0.5]).std)


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GDLAB_MLFLOW_PARENT_RUN_ID")
    }
    command = [str(Path(sys.executable).with_name("gdlab-sweep")), "lr", "--storage", f"sqlite:///{cwd}/o.db",
               "--progress", "0", "tracking=none", "dataset.n_samples=120", *args]  # fmt: skip
    return warm.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def history_rows(path: Path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_a_sweep_trial_is_the_aggregate_of_its_replicates_each_as_if_alone(tmp_path):
    proc = sweep(tmp_path, "--replicates", "3", "--population", "2", "--budget", "2", "--n-trials", "2",
                 "--no-refit", "trainer.max_epochs=20", "+gdlab_sweep.aggregate=median")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path}/o.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:
        replicates = trial.user_attrs["members"]
        assert replicates["seeds"] == [42, 43, 44] and replicates["aggregate"] == "median"
        assert trial.value == pytest.approx(float(np.median(replicates["values"])))
        for r, value in enumerate(replicates["values"]):
            folder = tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / f"replicate-{r}"
            overrides = (folder / "overrides.txt").read_text().split()
            assert overrides[-1] == f"seed={42 + r}"
            alone = gdlab.run([*overrides, "tracking=none"])
            assert value == pytest.approx(alone.final["objective"], abs=1e-8)
            assert len(history_rows(folder / "history.csv")) == 20


def test_a_pruned_trial_stops_all_its_replicates_at_once(tmp_path):
    proc = sweep(tmp_path, "--replicates", "3", "--population", "2", "--budget", "2", "--n-trials", "2",
                 "--no-refit", "trainer.max_epochs=60", "gdlab_sweep.report_every=5",
                 "gdlab_sweep.pruner._target_=optuna.pruners.ThresholdPruner",
                 "+gdlab_sweep.pruner.upper=0.0")  # every report is above it  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path}/o.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials:
        at_epoch_5 = []
        for r in range(3):
            folder = tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / f"replicate-{r}"
            rows = history_rows(folder / "history.csv")
            assert [int(row["epoch"]) for row in rows] == list(range(6))  # epochs 0..5, then retired
            at_epoch_5.append(float(rows[5]["val/loss"]))
        assert len(set(at_epoch_5)) == 3
        # one report, at epoch 5: the mean (the default aggregate) of the replicates' objectives there
        assert trial.intermediate_values == pytest.approx({5: np.mean(at_epoch_5)}, abs=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicates", "0"], "--replicates=0 is not allowed; use an integer >= 1"),
        (["+gdlab_sweep.replicates=0"], "sweeps/lr.yaml: gdlab_sweep.replicates=0 must be an integer >= 1"),
        (["+gdlab_sweep.replicates=two"], "sweeps/lr.yaml: gdlab_sweep.replicates='two' must be an integer"),
        (["++gdlab_sweep.cv_folds=1"], "sweeps/lr.yaml: gdlab_sweep.cv_folds=1 must be an integer in [2,"),
        (["+gdlab_sweep.aggregate=best"],
         "sweeps/lr.yaml: gdlab_sweep.aggregate='best' is not allowed; choose one of mean|median|worst"),
    ],
)  # fmt: skip
def test_bad_replicate_settings_are_one_line(refused, tmp_path, args, message):
    code, err = refused("lr", *args, "tracking=none")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"gdlab-sweep: error: {message}"), err


FOLDED = [*MOONS, "dataset.val_size=0", "dataset.cv_folds=4"]


def test_folds_are_disjoint_cover_the_non_test_rows_and_never_touch_the_test_rows():
    y = np.arange(120) % 2
    cfg = validate(compose_config(FOLDED)).dataset
    folds, tests = [], set()
    for j in range(4):
        cfg.cv_fold = j
        train, val, test = split_rows(cfg, y)
        assert not set(train) & set(val) and not (set(train) | set(val)) & set(test)
        folds.append(set(val))
        tests.add(tuple(sorted(test)))
    assert len(tests) == 1  # the same test rows for every fold
    test_rows = set(next(iter(tests)))
    assert all(not a & b for i, a in enumerate(folds) for b in folds[i + 1 :])
    assert set().union(*folds) == set(range(120)) - test_rows
    assert [len(f) for f in folds] == [24] * 4
    ones = [int(sum(y[list(f)])) for f in folds]
    assert max(ones) - min(ones) <= 1  # stratified: the classes spread evenly over the folds


@pytest.mark.parametrize("mode", MODES)
def test_a_fold_member_equals_a_run_trained_alone_on_that_fold(mode):
    overrides = [*FOLDED, *MODES[mode]]
    members = gdlab.run(overrides, population=[{"dataset.cv_fold": j} for j in range(4)])
    for j, member in enumerate(members):
        alone = gdlab.run([*overrides, f"dataset.cv_fold={j}"])
        assert (member.final["rows/train"], member.final["rows/val"]) == (len(alone.data.train), 24)
        for column in COMPARED + ["val/acc"]:
            np.testing.assert_allclose(member.history[column], alone.history[column], rtol=0, atol=1e-8,
                                       err_msg=f"{mode} fold {j} {column}")  # fmt: skip
        assert member.final["objective"] == pytest.approx(alone.final["objective"], abs=1e-8)
    assert len({m.final["objective"] for m in members}) == 4


def test_a_sweep_trial_aggregates_its_folds_and_seeds_and_the_refit_uses_every_non_test_row(tmp_path):
    proc = sweep(tmp_path, "++gdlab_sweep.cv_folds=3", "--replicates", "2", "--population", "2",
                 "--budget", "2", "--n-trials", "2", "trainer.max_epochs=15")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path}/o.db")
    for trial in study.trials:
        members = trial.user_attrs["members"]
        assert members["folds"] == [0, 0, 1, 1, 2, 2] and members["seeds"] == [42, 43] * 3
        assert trial.value == pytest.approx(float(np.mean(members["values"])))
        for m, (fold, seed) in enumerate(zip(members["folds"], members["seeds"], strict=True)):
            folder = tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / f"fold-{fold}"
            overrides = (folder / f"replicate-{seed - 42}" / "overrides.txt").read_text().split()
            assert overrides[-2:] == [f"dataset.cv_fold={fold}", f"seed={seed}"]
            alone = gdlab.run([*overrides, "tracking=none"])
            assert members["values"][m] == pytest.approx(alone.final["objective"], abs=1e-8)
    last = proc.stdout.strip().splitlines()[-1]
    assert "on 96 train + val rows" in last and "measured once on 24 test rows" in last, last


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.cv_folds=1"], "dataset.cv_folds=1 is out of range"),
        (["dataset.cv_folds=4", "dataset.cv_fold=4"], "dataset.cv_fold=4 is out of range"),
        (["dataset.cv_folds=4", "dataset.val_size=0.2"],
         "dataset.val_size=0.2 with dataset.cv_folds=4: the folds are the validation rows; set"),
        (["dataset.n_samples=4", "dataset.test_size=0.5", "dataset.cv_folds=3"],
         "dataset.cv_folds=3 needs at least 3 non-test rows; dataset=moons has 2"),
    ],
)  # fmt: skip
def test_bad_fold_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*MOONS, "dataset.val_size=0", *overrides]))
    assert str(error.value).startswith(message), str(error.value)


def test_wilcoxon_pruner_gets_each_fold_as_an_instance(tmp_path):
    proc = sweep(tmp_path, "++gdlab_sweep.cv_folds=3", "--population", "1", "--budget", "2",
                 "--n-trials", "2", "--no-refit", "trainer.max_epochs=12", "gdlab_sweep.report_every=5",
                 "gdlab_sweep.pruner._target_=optuna.pruners.WilcoxonPruner",
                 "+gdlab_sweep.pruner.p_threshold=0.1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path}/o.db")
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [15, 16, 17, 30, 31, 32]  # epochs 5, 10 x folds 0-2
        for fold in range(3):
            folder = tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / f"fold-{fold}"
            rows = history_rows(folder / "history.csv")
            for epoch in (5, 10):
                reported = trial.intermediate_values[epoch * 3 + fold]
                assert reported == pytest.approx(float(rows[epoch]["val/loss"]), abs=1e-12)


def test_a_tracked_trial_has_its_own_run_with_its_members_nested_under_it(tmp_path):
    from mlflow import MlflowClient

    proc = sweep(tmp_path, "--replicates", "3", "--population", "2", "--budget", "2", "--n-trials", "2",
                 "--no-refit", "trainer.max_epochs=10", "+gdlab_sweep.aggregate=median", "tracking=local",
                 f"tracking.dir={tmp_path / 'mlruns'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path}/o.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("gdlab.kind") == "sweep"]
    assert len(parents) == 1
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["gdlab.kind"] == "trial" and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert run.data.metrics["final/val/loss"] == pytest.approx(trial.value)  # the median it was ranked by
        members = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert sorted(r.data.tags["seed"] for r in members) == ["42", "43", "44"]
        member_curves = np.array([[m.value for m in client.get_metric_history(r.info.run_id, "val/loss")]
                                  for r in members])  # fmt: skip
        mean = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
        std = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss_std")]
        np.testing.assert_allclose(mean, member_curves.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(std, member_curves.std(axis=0, ddof=1), rtol=1e-9)
        summary = trial.user_attrs["members"]
        assert run.data.metrics["final/val/loss_ci_low"] == pytest.approx(summary["ci95"][0])
    from gdlab.report import build_report

    report = build_report(parents[0].info.run_id, tracking_uri=client.tracking_uri, out=tmp_path / "report",
                          objective="final/val/loss", log=False)  # fmt: skip
    figures = {drawn.path.name: drawn for drawn in report.figures}
    trial_labels = sorted(run.label for run in report.runs)
    assert len(trial_labels) == 2  # the report compares the trials, not their members
    assert sorted(figures["objective_vs_params.png"].spread) == trial_labels  # each with its interval bar
    assert "95% interval" in figures["objective_vs_params.png"].title
    assert sorted(figures["loss_curves.png"].spread) == trial_labels  # each mean curve with its band


def test_a_trial_run_handed_to_a_writer_that_dies_is_written_by_a_new_one(tmp_path):
    """The metric writer killed (the OOM killer, say) with a trial run's record in its pipe, unwritten: a new
    writer is handed it again, so the trial run ends FINISHED with its value instead of staying RUNNING."""
    import signal

    from mlflow import MlflowClient

    from gdlab.compose import compose_config
    from gdlab.metric_writer import MetricWriter
    from gdlab.sweep.trial_runs import finish_trial_run, wait_for_trial_runs
    from gdlab.tracking import tracking_uri

    members = [gdlab.run(["trainer.max_epochs=4", "tracking=none", f"seed={seed}"]) for seed in (1, 2)]
    cfg = compose_config([f"tracking.dir={tmp_path}"])
    client = MlflowClient(tracking_uri(cfg))
    run_id = client.create_run(client.create_experiment("trials")).info.run_id
    writer = MetricWriter.for_uri(tracking_uri(cfg))
    os.kill(writer.process.pid, signal.SIGSTOP)  # it takes nothing more from its pipe
    finish_trial_run(cfg, run_id, members, 0.25, "COMPLETE")
    os.kill(writer.process.pid, signal.SIGKILL)
    assert wait_for_trial_runs(cfg, [run_id]) is None and writer.process.poll() == -signal.SIGKILL
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
    assert run.data.metrics[f"final/{cfg.objective}"] == 0.25
    mean = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    expected = np.mean([member.history["train/loss"].to_numpy() for member in members], axis=0)
    np.testing.assert_allclose(mean[:-1], expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicates", "2"], "--replicates=2 with gdlab_sweep.pbt is not supported"),
        (
            ["++gdlab_sweep.cv_folds=3"],
            "sweeps/lr_pbt.yaml: gdlab_sweep.cv_folds=3 with gdlab_sweep.pbt is not",
        ),
    ],
)
def test_pbt_with_replicates_or_folds_is_refused_in_one_line(refused, args, message):
    code, err = refused("lr_pbt", *args, "tracking=none")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"gdlab-sweep: error: {message}"), err
