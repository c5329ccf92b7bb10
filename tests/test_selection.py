"""Sweeps choose on validation and measure the test split once: refusals, the refit and its record."""

import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

import warm
from gdlab.sweep.spec import available_sweeps, load_sweep

BIN = Path(sys.executable).parent
GENERALIZATION_SWEEPS = ("lr", "lr_depth", "lr_pbt", "digits_lr_pbt", "digits_depth_width", "optimizers",
                         "step_rules")  # fmt: skip


pytestmark = pytest.mark.usefixtures("clean_tracking_env")


def client_of(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def sweep_runs(cwd: Path, experiment: str) -> tuple:
    """(parent, trial runs, refit runs) of the one sweep in `experiment`."""
    client = client_of(cwd)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    refits = [r for r in children if r.data.tags.get("gdlab.role") == "refit"]
    return parent, [r for r in children if r not in refits], refits


def test_every_shipped_generalization_sweep_selects_on_validation():
    for name in available_sweeps():
        task = load_sweep(name).task
        if name in GENERALIZATION_SWEEPS:
            assert task.objective.startswith("val/") and task.dataset.val_size == 0.2, name
        else:  # the XOR fitting studies rank on what they report: the training loss
            assert task.objective == "train/loss" and task.dataset.val_size == 0, name


TEST_SWEEP = """# @package _global_
defaults:
  - override /dataset: moons
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: tpe
trainer:
  max_epochs: 20
objective: test/loss
tracking:
  experiment: sweep-on-test
hydra:
  sweeper:
    study_name: on_test
    storage: sqlite:///mlruns/optuna.db
    direction: minimize
    n_trials: 3
    n_jobs: 1
    sampler:
      seed: 1
    params:
      optimizer.lr: tag(log, interval(0.01, 1))
gdlab_sweep:
  population: 3
  pruner:
    _target_: optuna.pruners.NopPruner
"""


def write_sweep(folder: Path, body: str) -> Path:
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    (folder / "sweep" / "on_test.yaml").write_text(body)
    return folder


def test_gdlab_sweep_refuses_a_test_objective_in_one_line(refused, tmp_path):
    config_dir = write_sweep(tmp_path / "cfg", TEST_SWEEP)
    code, err = refused("on_test", "--config-dir", str(config_dir))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "objective=test/loss selects on the test split" in line
    assert "use objective=val/loss with dataset.val_size" in line and "select_on_test" in line
    code, err = refused("lr", "objective=test/acc", "direction=maximize")  # a shipped sweep, overridden
    assert code == 2 and "sweeps/lr.yaml: objective=test/acc selects on the test split" in err
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # refused before any study or trial


def test_gdlab_train_multirun_refuses_a_test_objective_in_one_line(tmp_path):
    done = warm.run([str(BIN / "gdlab-train"), "-m", "optimizer.lr=0.1,1", "objective=test/loss",
                           "trainer.max_epochs=3"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gdlab-train: error: objective=test/loss selects on the test split, so the sweep's test score "
        "would be optimistically biased; use objective=val/loss with dataset.val_size (e.g. 0.2): the test "
        "split then measures the chosen configuration once; or opt in knowingly with "
        "++gdlab_sweep.select_on_test=true"
    ]
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_select_on_test_runs_knowingly_and_says_so(tmp_path):
    config_dir = write_sweep(
        tmp_path / "cfg", TEST_SWEEP.replace("gdlab_sweep:\n", "gdlab_sweep:\n  select_on_test: true\n")
    )
    done = warm.run([str(BIN / "gdlab-sweep"), "on_test", "--config-dir", str(config_dir)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent, trials, refits = sweep_runs(tmp_path, "sweep-on-test")
    assert len(trials) == 3 and refits == []  # nothing new to measure: the test split chose
    assert parent.data.tags["gdlab.selected_on"] == "test"
    best = min(trials, key=lambda r: r.data.metrics["final/test/loss"])
    assert parent.data.metrics["result/test/loss"] == best.data.metrics["final/test/loss"]
    assert parent.data.tags["result.source"] == "best trial"
    assert "selected on the test split itself: optimistic" in done.stdout.strip().splitlines()[-1]
    report = next((tmp_path / "outputs" / "sweeps" / "on_test").glob("report-*/report.md")).read_text()
    assert report.splitlines()[0].endswith("(selected on test)")
    assert "**Selected on the test split**" in report


@pytest.mark.slow
def test_the_winner_is_refit_on_train_and_val_and_its_test_metrics_are_the_result(tmp_path):
    done = warm.run([str(BIN / "gdlab-sweep"), "lr", "trainer.max_epochs=40", "--budget", "6",
                           "--population", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    parent, trials, (refit,) = sweep_runs(tmp_path, "sweep-lr")
    assert len(trials) == 6
    # the winner is chosen on validation ...
    best = min(trials, key=lambda r: r.data.metrics["final/val/loss"])
    assert best.info.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best/val/loss"] == pytest.approx(study.best_value, rel=1e-12)
    # ... and refit with its own config on the 400 train + val rows; the 100 test rows are unchanged
    assert refit.data.params["optimizer.lr"] == best.data.params["optimizer.lr"]
    assert refit.data.params["seed"] == best.data.params["seed"]
    assert refit.data.params["trainer.max_epochs"] == best.data.params["trainer.max_epochs"] == "40"
    assert refit.data.params["dataset.val_size"] == "0.0"
    assert refit.data.metrics["final/rows/train"] == 400 and "final/rows/val" not in refit.data.metrics
    assert best.data.metrics["final/rows/train"] == 300 and best.data.metrics["final/rows/val"] == 100
    assert refit.data.metrics["final/rows/test"] == best.data.metrics["final/rows/test"] == 100
    assert refit.data.metrics["final/epochs"] == 40
    # the parent's result is the refit's test split, measured once
    for key in ("test/loss", "test/acc"):
        assert parent.data.metrics[f"result/{key}"] == refit.data.metrics[f"final/{key}"]
    assert (
        parent.data.tags["result.run_id"] == refit.info.run_id
        and parent.data.tags["result.source"] == "refit"
    )
    assert parent.data.tags["gdlab.selected_on"] == "val"
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"gdlab-sweep: result: test/loss={refit.data.metrics['final/test/loss']:.6g} ")
    assert (
        f"by the refit of trial #{study.best_trial.number} (selected on val) on 400 train + val rows" in last
    )
    # the report ranks the trials only, and carries the result
    report_dir = next((tmp_path / "outputs" / "sweeps" / "lr").glob("report-*"))
    report = (report_dir / "report.md").read_text()
    assert "6 runs; objective `final/val/loss`" in report and "refit of trial #" in report
    assert (report_dir / "validation_curves.png").is_file()
    ranked = [line for line in report.splitlines() if line.startswith("| optimizer.lr=")]
    assert len(ranked) == 12  # 6 in each table: not the refit
    first = next(line for line in report.split("## Final")[1].splitlines() if line.startswith("| optimizer"))
    assert first.startswith(f"| optimizer.lr={float(best.data.params['optimizer.lr']):.3g} |")  # best first


@pytest.mark.slow
def test_no_refit_reports_the_best_trials_own_test_metrics(tmp_path):
    done = warm.run([str(BIN / "gdlab-sweep"), "lr", "trainer.max_epochs=20", "--budget", "3",
                           "--population", "3", "--no-refit"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent, trials, refits = sweep_runs(tmp_path, "sweep-lr")
    assert refits == [] and len(trials) == 3
    best = min(trials, key=lambda r: r.data.metrics["final/val/loss"])
    assert parent.data.metrics["result/test/loss"] == best.data.metrics["final/test/loss"]
    assert parent.data.tags["result.source"] == "best trial"
    assert "the best trial's own" in done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_gdlab_train_multirun_refits_its_best_job(tmp_path):
    done = warm.run([str(BIN / "gdlab-train"), "-m", "hydra/sweeper=optuna", "+sweep=lr_depth",
                     "hydra.sweeper.n_trials=2",
                           "trainer.max_epochs=20"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent, trials, (refit,) = sweep_runs(tmp_path, "sweep-lr_depth")
    best = min(trials, key=lambda r: r.data.metrics["final/val/loss"])
    for key in ("optimizer.lr", "model.depth", "seed"):
        assert refit.data.params[key] == best.data.params[key]
    assert refit.data.metrics["final/rows/train"] == 400
    assert parent.data.metrics["result/test/loss"] == refit.data.metrics["final/test/loss"]
    assert "by the refit of job #" in done.stdout


@pytest.mark.slow
def test_a_pbt_winner_is_refit_by_replaying_its_schedule(tmp_path):
    command = [str(BIN / "gdlab-sweep"), "lr_pbt", "trainer.max_epochs=40", "gdlab_sweep.pbt.interval=10",
               "--budget", "6", "--population", "6"]  # fmt: skip
    done = warm.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="lr_pbt", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    replay = study.best_trial.user_attrs["pbt.replay"].split()
    schedule = next(o for o in replay if o.startswith("optimizer.lr_schedule="))
    parent, trials, (refit,) = sweep_runs(tmp_path, "sweep-lr_pbt")
    assert refit.data.params["optimizer.lr_schedule"].replace(" ", "") == schedule.split("=", 1)[1]
    assert (
        "dataset.val_size=0" in refit.data.tags["overrides"] and refit.data.metrics["final/rows/train"] == 400
    )
    assert parent.data.metrics["result/test/loss"] == refit.data.metrics["final/test/loss"]
