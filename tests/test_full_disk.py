"""A full disk under a run: the run ends FAILED with the reason, one line, and nothing on disk is destroyed.

Each test mounts a real tmpfs of a chosen size as the run's output folder (root only: skipped elsewhere).
"""

import csv
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

import gdlab
import warm

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("clean_tracking_env")
EPOCHS = 1000


@pytest.fixture
def small_disk(tmp_path):
    """mount(kib) -> a folder on a new tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        done = warm.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        warm.run(["umount", "-l", str(folder)], check=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_full_disk_at_the_end_keeps_the_appended_history_whole_and_fails_the_run(tmp_path, small_disk):
    overrides = [f"trainer.max_epochs={EPOCHS}", "tracking.plots=false"]
    reference = tmp_path / "reference"
    gdlab.run([*overrides, "tracking=none"], output_dir=reference)
    size = (reference / "history.csv").stat().st_size
    # room for the history appended epoch by epoch and one page more, not for the files written at the end
    # (config, overrides, weights: a page each). One page, not two: its `time` column makes this run's
    # history up to a few hundred bytes longer or shorter than the reference's, across a page boundary.
    disk = small_disk(-(-size // 4096) * 4 + 4)
    with pytest.warns(UserWarning, match="no space left on device writing .*; the run ended FAILED"):
        r = gdlab.run([*overrides, f"tracking.dir={tmp_path / 'mlruns'}"], output_dir=disk)
    kept = rows(disk / "history.csv")
    assert len(kept) == EPOCHS  # every epoch, as trained
    assert [float(row["train/loss"]) for row in kept] == list(r.history["train/loss"])
    assert [float(row["test/acc"]) for row in kept] == list(r.history["test/acc"])
    assert [p.name for p in disk.iterdir() if p.name.endswith(".new")] == []  # no half-written copy left
    assert r.final["record_error"].startswith(f"no space left on device writing {disk}")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(r.final["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.reason"] == r.final["record_error"]


def test_gdlab_train_on_a_disk_that_fills_during_training_ends_failed_in_one_line(tmp_path, small_disk):
    disk = small_disk(64)  # Hydra's .hydra/ files and a few hundred history rows
    done = warm.run([str(BIN / "gdlab-train"), "trainer.max_epochs=20000", f"hydra.run.dir={disk}/run",
                           f"tracking.dir={tmp_path / 'mlruns'}", "tracking.plots=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"gdlab-train: error: no space left on device writing {disk}")
    assert lines[-1].endswith("; the run ended FAILED") and "Traceback" not in done.stderr
    kept = (disk / "run" / "history.csv").read_text().splitlines()
    assert 10 < len(kept) < 20000  # the rows that fitted are kept
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moons").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.reason"].startswith("no space left on device writing")


def test_a_population_sweep_whose_outputs_fill_up_ends_every_trial_and_run(tmp_path, small_disk):
    outputs = small_disk(48)
    (tmp_path / "outputs").rmdir() if (tmp_path / "outputs").exists() else None
    (tmp_path / "outputs").symlink_to(outputs)  # the trials' folders fill up; the stores stay where they are
    done = warm.run([str(BIN / "gdlab-sweep"), "lr", "--population", "4", "--budget", "4",
                           "trainer.max_epochs=5000", "--progress", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "failure rate 100% is over 50%" in done.stderr
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    # every batch fails (FAILs do not count towards the budget) until the failure rate stops the sweep
    assert len(study.trials) >= 4 and {t.state for t in study.trials} == {TrialState.FAIL}  # none RUNNING
    assert all("No space left on device" in t.user_attrs["failure"] for t in study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    trials = [r for r in runs if "optuna.trial" in r.data.tags]
    assert len(trials) == len(study.trials) and {r.info.status for r in trials} == {"FAILED"}
    assert all(r.data.tags["failure.reason"].startswith("no space left on device writing") for r in trials)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"  # ended, not RUNNING: no trial finished


def test_a_read_only_store_is_one_line_from_either_command(tmp_path, small_disk):
    store = small_disk(20 * 1024)
    quick = ["trainer.max_epochs=3", "tracking.plots=false", f"tracking.dir={store}"]
    made = warm.run([str(BIN / "gdlab-sweep"), "lr", "--budget", "2", "--population", "2", "--no-refit",
                           f"--storage=sqlite:///{store}/optuna.db", *quick],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    warm.run(["mount", "-o", "remount,ro", str(store)], check=True)
    sweep = warm.run([str(BIN / "gdlab-sweep"), "lr", "--study", "another", f"--storage=sqlite:///{store}/optuna.db",
                            *quick], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert sweep.returncode == 2 and "Traceback" not in sweep.stderr
    assert sweep.stderr.strip().splitlines() == [
        "gdlab-sweep: error: study 'another': the Optuna storage refused it: attempt to write a readonly "
        "database"
    ]
    train = warm.run([str(BIN / "gdlab-train"), *quick, f"hydra.run.dir={tmp_path}/run"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 3 and "Traceback" not in train.stderr
    assert train.stderr.strip().splitlines() == [
        f"gdlab-train: error: cannot reach the MLflow tracking backend at sqlite:///{store}/mlflow.db: "
        "(sqlite3.OperationalError) attempt to write a readonly database"
    ]
