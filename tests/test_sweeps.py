"""Sweeps both ways: Hydra's Optuna sweeper (gdlab-train -m +sweep=NAME) and gdlab-sweep."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

import warm
from conftest import suspend_holding_no_lock
from gdlab.sweep import load_sweep
from gdlab.sweep.spec import available_sweeps
from gdlab.tracking import short_number

BIN = Path(sys.executable).parent
SHORT = ["trainer.max_epochs=20"]


pytestmark = pytest.mark.usefixtures("clean_tracking_env")


def sweep(*args, cwd, timeout=600):
    return warm.run([str(BIN / "gdlab-sweep"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)  # fmt: skip


def study(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}")


def runs_by_parent(cwd: Path, experiment: str) -> tuple[list, dict]:
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("gdlab.role") != "refit"]  # the refit is not a trial
    children = {p.info.run_id: [r for r in trials if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}  # fmt: skip
    return parents, children


def write_sweep(folder: Path, name: str, body: str) -> Path:
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    (folder / "sweep" / f"{name}.yaml").write_text(body)
    return folder


NAN_SWEEP = """# @package _global_
defaults:
  - override /dataset: moons
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: grid
dataset:
  val_size: 0.2
trainer:
  max_epochs: 15
objective: val/loss
tracking:
  experiment: sweep-diverging
hydra:
  sweeper:
    study_name: diverging
    storage: sqlite:///mlruns/optuna.db
    direction: minimize
    n_trials: 3
    n_jobs: 1
    params:
      optimizer.lr: choice(0.1, 1e200, 0.5)
gdlab_sweep:
  pruner:
    _target_: optuna.pruners.NopPruner
  max_failure_rate: 0.5
"""


def test_every_shipped_sweep_parses_and_validates():
    for name in (
        "lr_depth",
        "lr_depth_xor",
        "optimizers",
        "init_activation",
        "seeds",
        "digits_depth_width",
        "step_rules",
    ):
        spec = load_sweep(name)
        assert spec.study_name == name and spec.budget > 0 and spec.distributions, name
    spec = load_sweep("lr_depth")
    lr = spec.distributions["optimizer.lr"]
    assert (lr.low, lr.high, lr.log) == (1e-3, 10, True)
    assert (spec.distributions["model.depth"].low, spec.distributions["model.depth"].high) == (1, 4)
    assert isinstance(spec.pruner, optuna.pruners.MedianPruner)
    spec = load_sweep("step_rules")  # a full grid: every rule at every seed, on one evaluation budget
    assert spec.budget == 7 * 3 == len(spec.distributions["optimizer"].choices) * 3
    assert spec.task.trainer.max_evals == 600 and isinstance(spec.pruner, optuna.pruners.NopPruner)


@pytest.mark.slow
def test_hydras_optuna_sweeper_tracks_trials_and_resumes(tmp_path):
    """hydra/sweeper=optuna, for who chooses it: n_trials more trials per invocation (hydra#1679)."""
    command = [str(BIN / "gdlab-train"), "-m", "hydra/sweeper=optuna", "+sweep=lr_depth",
               "hydra.sweeper.n_trials=3", *SHORT]  # fmt: skip
    for invocation in ("first", "second"):
        proc = warm.run([*command, f"hydra.sweep.dir=multirun/{invocation}"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    trials = study(tmp_path, "lr_depth").trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for trial in trials:  # Hydra's sweeper tells its trials; each still names its run (optuna-dashboard)
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert float(run.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
        lead = run.info.run_name.split(" #")[0].split()  # the name leads with what the sweep varies
        assert sorted(lead) == sorted([f"lr={short_number(trial.params['optimizer.lr'])}",
                                       f"depth={trial.params['model.depth']}"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir()) == ["first", "second"]
    parents, children = runs_by_parent(tmp_path, "sweep-lr_depth")
    assert len(parents) == 2
    first = min(parents, key=lambda r: r.info.start_time)
    kids = children[first.info.run_id]
    assert len(kids) == 3
    expected = sorted((float(t.params["optimizer.lr"]), int(t.params["model.depth"])) for t in trials[:3])
    got = sorted((float(r.data.params["optimizer.lr"]), int(r.data.params["model.depth"])) for r in kids)
    assert got == expected  # repr round-trips floats exactly


@pytest.mark.slow
def test_gdlab_sweep_budget_pruning_and_the_parent_run(tmp_path):
    args = ["lr_depth", "trainer.max_epochs=60", "--budget", "8"]
    proc = sweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trial 8/8 " in proc.stdout and "done: 8/8 finished trials" in proc.stdout
    s = study(tmp_path, "lr_depth")
    states = [t.state for t in s.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8
    assert TrialState.PRUNED in states  # the hopeless small learning rates are stopped early
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0 and "budget reached" in again.stdout
    assert len(study(tmp_path, "lr_depth").trials) == 8

    parents, children = runs_by_parent(tmp_path, "sweep-lr_depth")
    assert len(parents) == 1
    parent, kids = parents[0], children[parents[0].info.run_id]
    assert len(kids) == 8
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in kids}
    for trial in s.trials:
        run = by_trial[trial.number]
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert run.data.tags["optuna.study"] == "lr_depth"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # every trial names its run
        lead = run.info.run_name.split(f" #{trial.number} ")[0].split()  # the name leads with what varies
        assert sorted(lead) == sorted([f"lr={short_number(trial.params['optimizer.lr'])}",
                                       f"depth={trial.params['model.depth']}"])  # fmt: skip
        if trial.state == TrialState.PRUNED:  # FINISHED, not a crash: the tag and the name say pruned
            assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"
            assert (
                run.info.run_name.endswith(" (pruned)")
                and "pruned at epoch" in run.data.tags["pruned.reason"]
            )
        else:
            assert run.data.metrics["final/val/loss"] == pytest.approx(trial.value)
    assert parent.data.metrics["best/val/loss"] == pytest.approx(s.best_value)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in plots and "optuna/param_importances.png" in plots


@pytest.mark.slow
def test_a_nan_trial_fails_and_the_sweep_goes_on(tmp_path):
    write_sweep(tmp_path / "cfg", "diverging", NAN_SWEEP)
    proc = sweep("diverging", "--config-dir", str(tmp_path / "cfg"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trials = study(tmp_path, "diverging").trials
    by_lr = {t.params["optimizer.lr"]: t for t in trials}
    assert by_lr[1e200].state == TrialState.FAIL
    assert "NaN/inf" in by_lr[1e200].user_attrs["failure"]
    assert by_lr[0.1].state == by_lr[0.5].state == TrialState.COMPLETE
    assert "FAIL" in proc.stdout and "reason=loss became NaN/inf" in proc.stdout


@pytest.mark.slow
def test_two_workers_lose_and_duplicate_nothing(tmp_path):
    proc = sweep("lr_depth", "trainer.max_epochs=15", "gdlab_sweep.pruner.n_startup_trials=100",
                 "--budget", "8", "--workers", "2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trials = study(tmp_path, "lr_depth").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 8 and len(complete) == len(trials)
    parents, children = runs_by_parent(tmp_path, "sweep-lr_depth")
    kids = children[parents[0].info.run_id]
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in kids)
    assert numbers == sorted(t.number for t in trials)  # exactly one child run per trial


@pytest.mark.slow
def test_exclusive_declines_on_stderr_and_plain_invocations_join(tmp_path):
    common = ["lr_depth", "trainer.max_epochs=200", "gdlab_sweep.pruner.n_startup_trials=100"]
    command = [str(BIN / "gdlab-sweep"), *common, "--budget", "50", "--exclusive"]
    first = warm.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert first.stdout.readline().startswith("gdlab-sweep: study 'lr_depth'")  # the lock is held
        # It stays held while the process is stopped (outside a SQLite write), without its CPU meanwhile.
        suspend_holding_no_lock(first.pid, [tmp_path / "mlruns" / db for db in ("optuna.db", "mlflow.db")])
        declined = sweep(*common, "--exclusive", cwd=tmp_path)
        assert declined.returncode == 0 and declined.stdout == ""
        assert f"already being run on this machine by process {first.pid}" in declined.stderr
        first.send_signal(signal.SIGCONT)  # training beside the one that joins
        joined = sweep(*common, "--n-trials", "1", cwd=tmp_path)  # not exclusive: it adds its trial
        assert joined.returncode == 0, joined.stderr
        assert "done: " in joined.stdout
    finally:
        first.kill()
        first.wait()
    mine = [t for t in study(tmp_path, "lr_depth").trials if t.state == TrialState.COMPLETE]
    assert len(mine) >= 1


def test_bad_sweep_input_is_refused_before_any_trial(tmp_path, refused):
    code, err = refused("no_such_sweep")
    assert code == 2
    shipped = ", ".join(available_sweeps())
    assert err.strip() == f"gdlab-sweep: error: unknown sweep 'no_such_sweep'; available: {shipped}"
    assert shipped.startswith("digits_depth_width, digits_lr_pbt, init_activation, lr, lr_depth")
    write_sweep(
        tmp_path / "cfg",
        "badkey",
        NAN_SWEEP.replace(
            "optimizer.lr: choice(0.1, 1e200, 0.5)", "optimizer.learning_rate: interval(0.1, 1)"
        ),
    )
    code, err = refused("badkey", "--config-dir", str(tmp_path / "cfg"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown key 'optimizer.learning_rate'" in err
    assert err.startswith(f"gdlab-sweep: error: {tmp_path / 'cfg' / 'sweep' / 'badkey.yaml'}: ")
    write_sweep(
        tmp_path / "cfg",
        "badrange",
        NAN_SWEEP.replace("optimizer.lr: choice(0.1, 1e200, 0.5)", "optimizer.lr: interval(-1, 1)"),
    )
    code, err = refused("badrange", "--config-dir", str(tmp_path / "cfg"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "optimizer.lr=-1" in err and "allowed: a number > 0" in err
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def readme_section_commands(section: str) -> list[list[str]]:
    """The `.venv/bin/...` commands of a README section's bash blocks, continuation lines joined, comments
    dropped."""
    import shlex

    text = (Path(__file__).parents[1] / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("\n", 1)[1] for block in body.split("```bash")[1:]]
    commands = []
    for block in (block.split("```", 1)[0] for block in blocks):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(".venv/bin/"):
                commands.append(shlex.split(line, comments=True))
    return commands


@pytest.mark.slow
def test_the_readme_sweep_commands_run_in_order(tmp_path):
    """What this checks is the order (each study's signature and budget): untracked, 3 epochs, so that its
    ~300 trials cost half as much; the tracked fronts have their own tests."""
    commands = readme_section_commands("Sweeps")
    assert len(commands) >= 5
    for command in commands:
        executable = str(BIN / Path(command[0]).name)
        proc = warm.run([executable, *command[1:], "trainer.max_epochs=3", "tracking=none"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=900)  # fmt: skip
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert "budget reached" not in proc.stdout, command  # each adds what its comment says


@pytest.mark.slow
def test_a_sobol_first_batch_leaves_no_trial_waiting_past_the_invocations_n_trials(tmp_path):
    """Batches of 8 with a Sobol first batch: `--n-trials 3` enqueues 3 points, not 8, so the study holds
    the 3 trials this invocation ran and nothing waiting for a later one."""
    proc = sweep("lr_depth", "trainer.max_epochs=3", "tracking=none", "--no-refit", "--n-trials", "3",
                 "--population", "8", "++gdlab_sweep.first_batch=sobol", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study(tmp_path, "lr_depth").get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs.get("first_batch") for t in trials] == ["sobol"] * 3


def test_a_batch_is_at_most_an_even_share_of_what_the_budget_leaves_among_the_workers():
    from gdlab.sweep.trials import batch_size

    assert batch_size(8, left=40, running=0, processes=1) == 8  # one process: a whole batch
    assert batch_size(8, left=4, running=0, processes=1) == 4  # at most what the budget leaves
    assert batch_size(8, left=4, running=0, processes=2) == 2  # the first of two takes half, not all
    assert batch_size(8, left=4, running=2, processes=2) == 2  # and the second the rest
    assert batch_size(8, left=8, running=0, processes=4) == 2  # the budget's end, spread over 4
    assert batch_size(8, left=40, running=8, processes=4) == 8  # a whole batch where there is room
    assert batch_size(8, left=3, running=3, processes=2) == 0  # all under way: wait
    assert batch_size(1, left=5, running=0, processes=3) == 1  # trial by trial as before


@pytest.mark.slow
def test_two_workers_with_batches_larger_than_the_budget_share_it(tmp_path):
    """`--workers 2 --budget 4` with batches of 8: whichever process asks first takes 2 trials, not all 4
    (it used to take the whole budget while the worker started), and the study ends with 4, or 5 where
    both asked for its last trial at once (K workers end up to K-1 past the budget, README)."""
    proc = sweep("lr_depth", "trainer.max_epochs=20", "tracking=none", "--no-refit", "--workers", "2",
                 "--budget", "4", "--population", "8", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials asked before any finished" in proc.stdout and "4 trials asked" not in proc.stdout
    trials = study(tmp_path, "lr_depth").get_trials(deepcopy=False)
    assert len(trials) in (4, 5) and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


@pytest.mark.slow
def test_a_new_studys_first_batch_covers_the_search_space_evenly(tmp_path, refused):
    """TPE asked for 16 trials before any finished draws 16 random lrs (`first_batch=sampler`, the default);
    with `first_batch=sobol` gdlab enqueues a scrambled Sobol batch instead: one lr in each sixteenth of the
    log range."""
    import math

    for first_batch, folder in (("sobol", tmp_path / "sobol"), ("sampler", tmp_path / "sampler")):
        folder.mkdir()
        proc = sweep("lr", "trainer.max_epochs=3", "tracking=none", "--no-refit", "--population", "16",
                     "--budget", "16", f"++gdlab_sweep.first_batch={first_batch}", cwd=folder)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = study(folder, "lr").get_trials(deepcopy=False)
        bins = sorted(int((math.log10(t.params["optimizer.lr"]) + 3) / 4 * 16) for t in trials)
        marked = [t.user_attrs.get("first_batch") for t in trials]
        if first_batch == "sobol":  # the log range [1e-3, 10] in 16 equal parts, one lr in each
            assert bins == list(range(16)) and marked == ["sobol"] * 16
            assert "16 of them are a scrambled Sobol cover of the search space" in proc.stdout
        else:
            assert len(set(bins)) < 16 and marked == [None] * 16  # random draws clump
            assert "this batch is its start-up draws (random)" in proc.stdout
    code, err = refused("lr", "++gdlab_sweep.first_batch=qmc")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "gdlab-sweep: error: sweeps/lr.yaml: gdlab_sweep.first_batch='qmc' is not allowed; choose one of "
        "sobol|sampler"
    )


@pytest.mark.parametrize("operation", ["ask", "get_trials"])
@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_signal_inside_an_optuna_session_comes_after_it_and_the_trial_can_be_failed(
    tmp_path, operation, nth
):
    """SIGTERM after the n-th statement of one of Optuna's SQLite sessions (an ask, a read): the handler's
    exception used to keep the session's read open while the cleanup told the running trial FAIL, which then
    failed ("database is locked") and left the trial RUNNING. Now the session completes first."""
    import signal

    from sqlalchemy import event

    from gdlab.interrupts import Interrupted, InterruptHandler
    from gdlab.sweep.study import make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    running = study.ask()
    optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").ask()  # another's: read
    engine = getattr(storage, "_backend", storage).engine
    seen = []

    def signal_mid_session(*args):
        seen.append(args)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGTERM)

    event.listen(engine, "after_cursor_execute", signal_mid_session)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    handler = InterruptHandler().install()
    try:
        with pytest.raises(Interrupted):
            try:
                study.ask() if operation == "ask" else study.get_trials(deepcopy=False)
            except Interrupted:
                study.tell(running, state=TrialState.FAIL)
                raise
    finally:
        event.remove(engine, "after_cursor_execute", signal_mid_session)
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert handler.signum == signal.SIGTERM
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert stored.get_trials(deepcopy=False)[running.number].state == TrialState.FAIL


def test_a_signal_inside_an_ask_fails_the_trial_it_made(tmp_path, monkeypatch):
    """SIGTERM inside `study.ask()`, once Optuna has made the trial RUNNING but before the ask returned it:
    that trial used to stay RUNNING for good (it never got a heartbeat, so nothing would fail it, and a later
    sweep could wait on it). Now the signal comes once the trial is held, and the sweep FAILs it."""
    import signal

    from gdlab.sweep import cli, owned_trials

    made = []
    create = owned_trials.OwnedTrialsStorage.create_new_trial

    def create_then_signal(self, *args, **kwargs):
        made.append(create(self, *args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)
        return made[-1]

    monkeypatch.setattr(owned_trials.OwnedTrialsStorage, "create_new_trial", create_then_signal)
    monkeypatch.chdir(tmp_path)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = cli.main(["lr", "tracking=none", "--n-trials", "2", "--population", "2", "--progress", "0"])
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert code == 143 and len(made) == 1
    (database,) = tmp_path.rglob("optuna.db")
    (trial,) = optuna.load_study(study_name="lr", storage=f"sqlite:///{database}").get_trials(deepcopy=False)
    assert trial._trial_id == made[0] and trial.state == TrialState.FAIL


def test_a_sweep_that_fails_on_an_error_ends_its_parent_run_failed(tmp_path, monkeypatch):
    """An unexpected error after the trials (here: in choosing the result) propagates, but the sweep's
    parent run ends FAILED with the error as its reason instead of staying RUNNING."""
    from gdlab.sweep import cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug after the trials")

    monkeypatch.setattr(cli, "sweep_result", broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="a bug after the trials"):
        cli.main(["lr", "trainer.max_epochs=3", "tracking.plots=false", "--n-trials", "2", "--progress", "0"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("gdlab.kind") == "sweep"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure.reason"] == "RuntimeError: a bug after the trials"
    assert sorted(run.info.status for run in runs if run is not parent) == ["FINISHED", "FINISHED"]


def test_a_signal_while_the_parent_run_is_made_ends_it_killed(tmp_path, monkeypatch):
    """SIGTERM after MLflow made the sweep's parent run but before gdlab-sweep held its id: it used to stay
    RUNNING. Now the signal comes once the id is held, and the parent ends KILLED before any trial."""
    import signal

    from gdlab import system_metrics
    from gdlab.sweep import cli

    def signal_once_made(cfg, uri, run_id):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(system_metrics, "start", signal_once_made)  # start_parent_run's last step
    monkeypatch.chdir(tmp_path)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = cli.main(
            ["lr", "trainer.max_epochs=3", "tracking.plots=false", "--n-trials", "2", "--progress", "0"]
        )
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert code == 143
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    assert parent.data.tags["gdlab.kind"] == "sweep" and parent.info.status == "KILLED"
    assert parent.data.tags["failure.reason"] == "interrupted by SIGTERM"


def test_a_study_store_whose_tables_another_process_creates_meanwhile_opens(tmp_path):
    """Optuna's own processes (optuna-dashboard, a user's script) do not take gdlab's lock. When one creates
    Optuna's tables while gdlab-sweep creates them on the same new database, gdlab's creation met "table
    already exists" (PostgreSQL: "duplicate key ... pg_type") and the sweep refused its --storage. It now
    opens it."""
    import sqlalchemy
    from optuna.storages._rdb import models

    from gdlab.sweep.study import make_storage

    url = (
        f"sqlite:///{tmp_path / 'optuna.db'}"  # (on PostgreSQL both creations would wait on each other here)
    )
    other = sqlalchemy.create_engine(url)
    created = []

    def another_process_first(metadata, connection, **kwargs):
        if not created:  # the foreign creator commits its tables just before this creation's
            created.append(True)
            metadata.create_all(other)

    sqlalchemy.event.listen(models.BaseModel.metadata, "before_create", another_process_first)
    try:
        storage = make_storage(url)
    finally:
        sqlalchemy.event.remove(models.BaseModel.metadata, "before_create", another_process_first)
        other.dispose()
    assert created
    study = optuna.create_study(storage=storage, study_name="s")
    study.tell(study.ask(), 1.0)
    assert [t.value for t in optuna.load_study(study_name="s", storage=url).get_trials()] == [1.0]


def test_a_trial_taken_by_heartbeat_before_its_training_is_said_and_not_trained(
    tmp_path, monkeypatch, capsys
):
    """A process stopped between asking a trial and drawing its values, resumed after another process failed
    that trial by heartbeat: nothing is trained for it, and one line says so (it had no run to end)."""
    from gdlab.sweep.spec import load_sweep
    from gdlab.sweep.trials import TrialLogger, run_trial_batch

    monkeypatch.chdir(tmp_path)
    spec = load_sweep("lr", ["tracking=none"])
    study = optuna.create_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask()
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # as fail_stale_trials does
    logger = TrialLogger(budget=4, max_failure_rate=1.0)
    run_trial_batch(spec, study, [trial], tmp_path / "outputs", logger)
    err = capsys.readouterr().err
    assert "gdlab-sweep: trial #0 was failed by heartbeat while its process was stopped" in err
    assert logger.taken == {0} and study.trials[0].state == TrialState.FAIL and not trial.params
    assert not (tmp_path / "outputs").exists()
