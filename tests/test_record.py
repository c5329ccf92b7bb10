"""A record you can trust: distinct trials, concurrent first runs, SIGTERM to the process group, no
secret on a command line. Real processes, real signals, real SQLite stores."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from gdlab.metric_writer import MetricWriter

BIN = Path(sys.executable).parent
QUICK = ["tracking=none", "trainer.max_epochs=3"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GDLAB_MLFLOW_PARENT_RUN_ID", raising=False)


def gdlab(command: str, *args, cwd: Path, **kwargs):
    return subprocess.Popen([str(BIN / command), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def finish(process, timeout=600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.mark.slow
def test_invocations_and_workers_draw_distinct_trials_and_share_n_trials(tmp_path: Path):
    for _ in range(3):
        code, _, err = finish(gdlab("gdlab-sweep", "lr_depth", "--n-trials", "4", *QUICK, cwd=tmp_path))
        assert code == 0, err[-2000:]
    code, _, err = finish(gdlab("gdlab-sweep", "lr_depth", "--workers", "3", "--n-trials", "12", *QUICK,
                                cwd=tmp_path))  # fmt: skip
    assert code == 0, err[-2000:]
    study = optuna.load_study(study_name="lr_depth", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 24  # --n-trials 12 is the invocation's, shared by its 3 processes
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 24


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_non_positive_or_non_finite_counts_are_refused_before_any_trial(tmp_path: Path, value):
    for option in ("--n-trials", "--budget", "--timeout") if value in ("0", "-3") else ("--timeout",):
        code, _, err = finish(gdlab("gdlab-sweep", "lr", option, value, *QUICK, cwd=tmp_path))
        assert code == 2 and f"{option}=" in err and "not allowed" in err, err
        assert "Traceback" not in err and not (tmp_path / "mlruns" / "optuna.db").exists()


@pytest.mark.slow
def test_runs_started_together_on_a_new_store_all_finish_in_their_own_directories(tmp_path: Path):
    arguments = ["dataset=xor", "trainer.max_epochs=20", "tracking.plots=false"]
    processes = [gdlab("gdlab-train", *arguments[:2], f"seed={seed}", arguments[2], cwd=tmp_path)
                 for seed in (1, 2, 3)]  # fmt: skip
    for process in processes:
        code, _, err = finish(process)
        assert code == 0 and "Traceback" not in err, err[-3000:]
    directories = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(directories) == 3
    assert sorted((d / "overrides.txt").read_text().split()[2] for d in directories) == [
        "seed=1",
        "seed=2",
        "seed=3",
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_sigterm_to_the_process_group_keeps_every_epoch_and_the_final_metrics(tmp_path: Path):
    process = gdlab("gdlab-train", "dataset=xor", "trainer.max_epochs=200000", "tracking.plots=false",
                    "tracking.flush_seconds=0.2", cwd=tmp_path, start_new_session=True)  # fmt: skip
    database = tmp_path / "mlruns" / "mlflow.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "outputs").glob("*/*/.hydra")):
        time.sleep(0.5)
    time.sleep(8)  # well into training, with metrics handed to the writer
    os.killpg(process.pid, signal.SIGTERM)  # what systemd, docker and SLURM send: the whole group
    code, _, err = finish(process, timeout=300)
    assert code == 143, err[-3000:]
    history = pd.read_csv(next((tmp_path / "outputs").glob("*/*/history.csv")))
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert run.info.status == "KILLED"
    assert 100 < len(history) < 200000
    logged = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(logged) == len(history)  # every epoch trained is in MLflow, none lost with the writer
    assert run.data.metrics["final/epochs"] == len(history)
    assert "final/train/loss" in run.data.metrics


def test_the_metric_writer_gets_its_tracking_uri_off_the_command_line(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'a-secret-place' / 'mlflow.db'}"
    writer = MetricWriter(uri)
    try:
        command_line = Path(f"/proc/{writer.process.pid}/cmdline").read_bytes().decode()
        assert "gdlab.metric_writer" in command_line and "a-secret-place" not in command_line
        assert uri in Path(f"/proc/{writer.process.pid}/environ").read_bytes().decode()
    finally:
        writer.process.kill()
        writer.process.wait()
