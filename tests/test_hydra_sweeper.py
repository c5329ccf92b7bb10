"""`gdlab-train -m +sweep=NAME hydra/sweeper=gdlab`: Hydra multirun through gdlab-sweep's engine (pruning,
the budget across invocations, the record, signals). Real processes, real SQLite stores."""

import collections
import os
import signal
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

import warm
from test_record import finish, gdlab, wait_for_running_trial

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

BIN = Path(sys.executable).parent
GDLAB = ["-m", "hydra/sweeper=gdlab"]
# Trials trained in this process (Hydra's basic launcher), or in jobs of a process launcher.
LAUNCHERS = {"basic": [], "submitit_local": ["hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2"]}

pytestmark = pytest.mark.usefixtures("clean_tracking_env")


def stores(cwd: Path) -> tuple[str, MlflowClient]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    return f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}", client


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_multirun_through_the_gdlab_sweeper_prunes_adds_to_the_budget_and_names_each_trials_run(
    tmp_path, launcher
):
    sweep = [*GDLAB, *LAUNCHERS[launcher], "+sweep=lr_depth", "trainer.max_epochs=60",
             "gdlab_sweep.pruner.n_startup_trials=2"]  # fmt: skip
    first = [*sweep, "hydra.sweeper.n_trials=8"]
    code, out, err = finish(gdlab("gdlab-train", *first, cwd=tmp_path))
    assert code == 0, err[-3000:]
    assert "done: 8/8 finished trials" in out and "result: test/loss=" in out
    storage, client = stores(tmp_path)
    trials = optuna.load_study(study_name="lr_depth", storage=storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(8))  # the seeded first batch diverges nowhere
    assert optuna.load_study(study_name="lr_depth", storage=storage).metric_names == ["val/loss"]  # dashboard
    assert TrialState.PRUNED in {t.state for t in trials}  # the sweep file's MedianPruner, in the jobs too
    experiment = client.get_experiment_by_name("sweep-lr_depth").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    (parent,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]  # no second parent
    assert parent.data.tags["gdlab.kind"] == "sweep" and parent.info.status == "FINISHED"
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]  # the trial's own run, by id
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["optuna.state"] == "PRUNED"
        else:
            assert run.data.metrics["final/val/loss"] == pytest.approx(trial.value)

    again = [*sweep, "hydra.sweeper.n_trials=10"]
    code, out, err = finish(gdlab("gdlab-train", *again, cwd=tmp_path))
    assert code == 0, err[-3000:]
    trials = optuna.load_study(study_name="lr_depth", storage=storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    # Two more finished (the budget is the study's); a diverged lr fails and is not one of them.
    states = collections.Counter(t.state for t in trials[8:])
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 2, (states, out[-2000:])
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}, (states, out[-2000:])
    failed = [t.user_attrs.get("failure", "") for t in trials if t.state == TrialState.FAIL]
    assert all("became NaN/inf" in reason for reason in failed), failed
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # none replayed
    code, out, _ = finish(gdlab("gdlab-train", *again, cwd=tmp_path))
    assert code == 0 and "budget reached" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "signum"),
    [
        ("basic", signal.SIGTERM),
        ("basic", signal.SIGINT),
        ("submitit_local", signal.SIGTERM),
        ("submitit_local", signal.SIGINT),
    ],
)
def test_a_signal_to_the_group_leaves_no_trial_or_run_running(tmp_path, launcher, signum):
    """SIGTERM (systemd, SLURM) or Ctrl-C to the group: in a launcher's job too, the population's trials end
    FAIL and their runs KILLED (submitit's controller follows Ctrl-C with SIGKILL: the sweep ends them)."""
    process = gdlab("gdlab-train", *GDLAB, *LAUNCHERS[launcher], "+sweep=lr", "trainer.max_epochs=200000",
                    "tracking.plots=false", cwd=tmp_path, start_new_session=True)  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    shipped = OmegaConf.load(SWEEPS / "lr.yaml")
    jobs_at_once = 2 if launcher == "submitit_local" else 1  # hydra.sweeper.n_jobs: a batch each
    running = min(shipped.gdlab_sweep.population * jobs_at_once, shipped.hydra.sweeper.n_trials)
    wait_for_running_trial(storage, "lr", process, count=running)  # every job's batch: a job starts later
    os.killpg(process.pid, signum)
    code, _, err = finish(process, timeout=300)
    assert code == 128 + signum, err[-3000:]
    assert f"interrupted by {signal.Signals(signum).name}" in err, err[-3000:]
    assert "/gdlab/" not in err, err[-3000:]  # no traceback through gdlab (submitit's controller prints one)
    trials = optuna.load_study(study_name="lr", storage=storage).get_trials(deepcopy=False)
    states = collections.Counter(t.state.name for t in trials)
    assert states == {"FAIL": running}, (states, err[-3000:])  # the batches that were training
    _, client = stores(tmp_path)  # made by gdlab: an MlflowClient on a path makes a store there at once
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == running + 1  # and the parent


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["+sweep=lr", "hydra/launcher=submitit_local", "tracking=server", "tracking.uri=http://u:pw@localhost:1"],
         "gdlab-train: error: tracking.uri holds a password, which hydra/launcher=submitit_local would"),
        (["+sweep=lr", "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=0"],
         "gdlab-train: error: hydra.sweeper.n_jobs=0 is not allowed with hydra/launcher=submitit_local"),
        (["optimizer.lr=0.1,0.2"],
         "gdlab-train: error: hydra/sweeper=gdlab runs a sweep file: add +sweep=NAME"),
        (["+sweep=lr", "hydra.sweeper.n_trials=0"],
         "gdlab-sweep: error: sweeps/lr.yaml: hydra.sweeper.n_trials=0 is out of range"),
    ],
)  # fmt: skip
def test_what_the_gdlab_sweeper_cannot_run_is_one_line_before_any_work(tmp_path, arguments, line):
    proc = warm.run([str(BIN / "gdlab-train"), *GDLAB, *arguments], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlruns" / "optuna.db").exists()
    assert ":pw@" not in proc.stderr + proc.stdout


ONE_ENGINE = {  # a sweep, its budget, its settings
    "pruning": ("lr_depth", 6, ["trainer.max_epochs=60", "gdlab_sweep.pruner.n_startup_trials=2"]),
    "population, replicates and folds": ("lr", 6, ["trainer.max_epochs=30", "gdlab_sweep.population=3",
                                                   "++gdlab_sweep.replicates=2", "++gdlab_sweep.cv_folds=2"]),
    "pbt": ("lr_pbt", 8, ["trainer.max_epochs=40", "gdlab_sweep.pbt.interval=10",
                          "gdlab_sweep.population=8"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", ONE_ENGINE)
def test_both_fronts_run_one_engine(tmp_path, case):
    """`gdlab-sweep NAME` and `gdlab-train -m +sweep=NAME` on a new study: the same trials, states, values
    and members, trial by trial."""
    name, budget, settings = ONE_ENGINE[case]
    settings = [*settings, f"hydra.sweeper.n_trials={budget}", "tracking=none", "++gdlab_sweep.refit=false"]
    fronts = {"sweep": ["gdlab-sweep", name], "multirun": ["gdlab-train", "-m", f"+sweep={name}"]}
    seen = {}
    for front, command in fronts.items():
        (tmp_path / front).mkdir()
        code, out, err = finish(gdlab(*command, *settings, cwd=tmp_path / front))
        assert code == 0, err[-3000:]
        if case == "population, replicates and folds":  # TPE's first batch is said to be random, not silently
            assert "has nothing to learn from yet, so this batch is its start-up draws (random)" in out
        storage = f"sqlite:///{tmp_path / front / 'mlruns' / 'optuna.db'}"
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        replay = [sorted(t.user_attrs.get("pbt.replay", "").split()) for t in trials]  # overrides, any order
        seen[front] = [(t.number, t.state, t.params, t.value, t.user_attrs.get("members"), r)
                       for t, r in zip(trials, replay, strict=True)]  # fmt: skip
    assert len(seen["sweep"]) == budget and seen["sweep"] == seen["multirun"]
