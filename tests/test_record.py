"""A record you can trust: distinct trials, concurrent first runs, SIGTERM to the process group, no
secret on a command line. Real processes, real signals, real SQLite stores."""

import contextlib
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

import warm
from conftest import live_study, suspend_holding_no_lock
from gdlab.metric_writer import MetricWriter

BIN = Path(sys.executable).parent
QUICK = ["tracking=none", "trainer.max_epochs=3"]


pytestmark = pytest.mark.usefixtures("clean_tracking_env")


def gdlab(command: str, *args, cwd: Path, cold: bool = False, **kwargs):
    """The command started by the suite's warm server (tests/warm.py), or `cold` by a new interpreter, for
    tests of what happens while it imports."""
    start = subprocess.Popen if cold else warm.Popen
    pipe = subprocess.PIPE
    return start([str(BIN / command), *args], cwd=cwd, stdout=pipe, stderr=pipe, text=True, **kwargs)


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


@pytest.mark.slow
def test_two_invocations_started_together_on_a_new_study_draw_distinct_trials(tmp_path: Path):
    both = [gdlab("gdlab-sweep", "lr_depth", "--n-trials", "4", "--no-refit", *QUICK, cwd=tmp_path)
            for _ in range(2)]  # fmt: skip
    for process in both:
        code, _, err = finish(process)
        assert code == 0, err[-2000:]
    study = optuna.load_study(study_name="lr_depth", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8 and len({tuple(sorted(t.params.items())) for t in trials}) == 8
    # the process that created the study drew the sweep file's stream: a fresh sweep reproduces
    alone = tmp_path / "alone"
    alone.mkdir()
    code, _, err = finish(gdlab("gdlab-sweep", "lr_depth", "--n-trials", "4", *QUICK, cwd=alone))
    assert code == 0, err[-2000:]
    fresh = optuna.load_study(study_name="lr_depth", storage=f"sqlite:///{alone / 'mlruns' / 'optuna.db'}")
    first = [t.params for t in fresh.get_trials(deepcopy=False)][:1]
    assert first[0] in [t.params for t in trials]


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden"])
def test_a_study_name_that_is_not_one_word_is_refused(tmp_path: Path, refused, name):
    code, err = refused("lr", "--study", name, *QUICK)
    assert code == 2 and f"--study={name!r} is not allowed; use letters, digits" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_non_positive_or_non_finite_counts_are_refused_before_any_trial(tmp_path: Path, refused, value):
    for option in ("--n-trials", "--budget", "--timeout") if value in ("0", "-3") else ("--timeout",):
        code, err = refused("lr", option, value, *QUICK)
        assert code == 2 and f"{option}=" in err and "not allowed" in err, err
        assert not (tmp_path / "mlruns" / "optuna.db").exists()


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
    wait_for_history(tmp_path, process, rows=2000)  # well into training, with metrics handed to the writer
    os.killpg(process.pid, signal.SIGTERM)  # what systemd, docker and SLURM send: the whole group
    code, _, err = finish(process, timeout=300)
    assert code == 143, err[-3000:]
    history = pd.read_csv(next((tmp_path / "outputs").glob("*/*/history.csv")))
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert run.info.status == "KILLED"
    assert 100 < len(history) < 200000
    logged = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(logged) == len(history) + 1  # every epoch trained, and the final value: none lost
    assert run.data.metrics["final/epochs"] == len(history)
    assert "final/train/loss" in run.data.metrics
    assert run.data.tags["failure.reason"] == "interrupted by SIGTERM"


def wait_for_history(cwd: Path, process, rows: int, timeout: float = 300) -> None:
    """Until the run's history.csv holds `rows` epochs (a busy machine only makes this take longer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = list((cwd / "outputs").glob("*/*/history.csv"))
        if found and sum(1 for _ in open(found[0])) > rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"no history of {rows} epochs (exit status {process.poll()})")


def wait_for_sigterm_handler(process, timeout: float = 60) -> None:
    """Until the process catches SIGTERM: its console script's first line has run, its imports have not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        status = Path(f"/proc/{process.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
    raise AssertionError("the process never caught SIGTERM")


@pytest.mark.slow
def test_sigterm_during_start_up_ends_the_run_killed_not_by_the_default_action(tmp_path: Path):
    process = gdlab("gdlab-train", "dataset=xor", "trainer.max_epochs=200000", "tracking.plots=false",
                    cwd=tmp_path, start_new_session=True, cold=True)  # fmt: skip
    wait_for_sigterm_handler(process)
    os.killpg(process.pid, signal.SIGTERM)  # while it imports torch, Lightning and Hydra
    code, _, err = finish(process, timeout=300)
    assert code == 143, err[-3000:]  # not -15, the default action's
    assert err.strip().splitlines()[-1].startswith("gdlab-train: stopped by SIGTERM; the run ended KILLED")
    history = pd.read_csv(next((tmp_path / "outputs").glob("*/*/history.csv")))
    assert len(history) < 100  # it stopped at once, after its first epoch
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["failure.reason"] == "interrupted by SIGTERM"


def test_sigterm_during_start_up_stops_gdlab_sweep_before_any_trial(tmp_path: Path):
    process = gdlab("gdlab-sweep", "lr", cwd=tmp_path, start_new_session=True, cold=True)
    wait_for_sigterm_handler(process)
    os.killpg(process.pid, signal.SIGTERM)
    code, _, err = finish(process, timeout=300)
    assert code == 143, err[-3000:]
    assert err.strip().splitlines() == ["gdlab-sweep: interrupted by SIGTERM before any trial started"]
    assert not (tmp_path / "mlruns").exists()


def test_the_metric_writer_gets_its_tracking_uri_off_the_command_line(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'a-secret-place' / 'mlflow.db'}"
    writer = MetricWriter(uri)
    try:
        command_line, deadline = "", time.monotonic() + 60
        while not command_line and writer.process.poll() is None and time.monotonic() < deadline:
            command_line = Path(f"/proc/{writer.process.pid}/cmdline").read_bytes().decode()  # "" mid-exec
        assert writer.process.poll() is None, "the writer exited before it was given anything"
        assert "gdlab.writer_process" in command_line and "a-secret-place" not in command_line
        assert uri in Path(f"/proc/{writer.process.pid}/environ").read_bytes().decode()
    finally:
        writer.process.kill()
        writer.process.wait()


def wait_for_running_trial(storage: str, name: str, process, timeout=180, count: int = 1) -> None:
    """Until the sweep trains: at least `count` of its trials RUNNING in Optuna (all of them: a launcher's
    jobs each ask their own), each with its RUNNING child run in MLflow."""
    # Its header comes once the study exists: opening the store before would race its creation.
    assert process.stdout.readline().startswith(f"gdlab-sweep: study {name!r}"), process.stderr.read()[-3000:]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gdlab-sweep exited {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            trials = live_study(name, storage).get_trials(deepcopy=False)
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if len(running) >= count:  # the parent run and the MLflow store came first: a client makes none
                client = MlflowClient(storage.replace("optuna.db", "mlflow.db"))
                experiment = client.get_experiment_by_name(f"sweep-{name}").experiment_id
                runs = client.search_runs([experiment], "attributes.status = 'RUNNING'")
                if sum("mlflow.parentRunId" in r.data.tags for r in runs) >= len(running):
                    return
        except Exception:  # noqa: BLE001 (a store, the study or the experiment is not created yet)
            pass
        time.sleep(0.5)
    raise AssertionError("no trial started")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "population"), [(signal.SIGTERM, 143, "1"), (signal.SIGINT, 130, "3")]
)
def test_a_signalled_sweep_fails_its_running_trials_and_kills_its_runs(
    tmp_path: Path, signum, code, population
):
    process = gdlab("gdlab-sweep", "lr", "trainer.max_epochs=200000", "tracking.plots=false",
                    "--population", population, cwd=tmp_path, start_new_session=True)  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    wait_for_running_trial(storage, "lr", process)
    os.killpg(process.pid, signum)  # the whole group, as systemd/SLURM (SIGTERM) or a terminal (SIGINT) do
    returncode, _, err = finish(process, timeout=300)
    assert returncode == code, err[-3000:]
    assert f"interrupted by {signum.name}" in err and "Traceback" not in err, err[-3000:]
    trials = optuna.load_study(study_name="lr", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == int(population)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED"] * (int(population) + 1)  # children + parent
    (parent,) = [r for r in runs if r.data.tags.get("gdlab.kind") == "sweep"]
    assert parent.data.tags["failure.reason"] == f"interrupted by {signum.name}"
    # the trials' too (said "before training: ..." where the signal came before their first epoch, "while
    # recording: ..." where it came after their last)
    reasons = {r.data.tags["failure.reason"] for r in runs}
    said = f"interrupted by {signum.name}"
    assert reasons <= {said, f"before training: {said}", f"while recording: {said}"}


@pytest.mark.slow
def test_sigterm_during_the_refit_ends_it_killed_and_leaves_no_drawing_child_or_folder(tmp_path: Path):
    """SIGTERM to the group while the refit trains and the sweep's end is drawn in forked children: the
    refit's and the parent's runs end KILLED, the trials' runs stay FINISHED, no process of the group is
    left, and Optuna's plots leave no temporary folder."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = gdlab("gdlab-sweep", "lr", "trainer.max_epochs=3000", "--n-trials", "2", "--population", "2",
                    "--progress", "0", cwd=tmp_path, start_new_session=True,
                    env={**os.environ, "TMPDIR": str(temporary)})  # fmt: skip
    # A trial runs once the sweep has made its MLflow store: a client opened before would make it too.
    wait_for_running_trials(f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}", "lr", process, count=1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-lr")
    deadline, refit = time.monotonic() + 600, []
    while time.monotonic() < deadline and process.poll() is None and not refit:
        time.sleep(0.05)
        refit = client.search_runs([experiment.experiment_id], "tags.`gdlab.role` = 'refit'")
    assert refit and refit[0].info.status == "RUNNING", f"no refit seen: {finish(process)[2][-2000:]}"
    os.killpg(process.pid, signal.SIGTERM)
    code, _, err = finish(process, timeout=300)
    assert code == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    left = warm.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert left == []  # the drawing children went with the command
    assert not list(temporary.glob("gdlab-optuna-plots-*"))
    runs = client.search_runs([experiment.experiment_id])
    by_kind = {}
    for run in runs:
        kind = run.data.tags.get("gdlab.role") or run.data.tags.get("gdlab.kind") or "trial"
        by_kind.setdefault(kind, []).append(run.info.status)
    assert by_kind == {"refit": ["KILLED"], "sweep": ["KILLED"], "trial": ["FINISHED", "FINISHED"]}, by_kind


BASIC_MULTIRUN_STOPS = [(signal.SIGTERM, 143, "gdlab-train"), (signal.SIGINT, 130, "gdlab-train"),
                        (signal.SIGTERM, 143, "python -m gdlab.train")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "command"), BASIC_MULTIRUN_STOPS)
def test_a_signal_to_a_basic_multirun_ends_its_parent_killed_without_a_refit(tmp_path: Path, signum, code,
                                                                             command):  # fmt: skip
    """`gdlab-train -m` on Hydra's basic sweeper: Hydra ends the multirun in a `finally` after the stopped
    job's exit, so the callback used to refit the best job and end the parent FINISHED (Ctrl-C), or leave it
    RUNNING (SIGTERM). Now the job's run and the parent end KILLED, and nothing is refit. `python -m
    gdlab.train` too: its job used to note the stop in the __main__ copy of gdlab.train, which the callback
    does not read (the parent then ended FINISHED with a refit)."""
    args = ["-m", "optimizer.lr=0.1,0.2", "trainer.max_epochs=200000", "tracking.plots=false"]
    if command == "gdlab-train":
        process = gdlab(command, *args, cwd=tmp_path, start_new_session=True)
    else:
        process = subprocess.Popen([sys.executable, "-m", "gdlab.train", *args], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # fmt: skip
    store = tmp_path / "mlruns" / "mlflow.db"
    deadline, running = time.monotonic() + 300, []
    while time.monotonic() < deadline and process.poll() is None and not running:
        time.sleep(0.2)
        if store.exists():
            with contextlib.suppress(Exception):
                client = MlflowClient(tracking_uri=f"sqlite:///{store}")
                experiments = [e.experiment_id for e in client.search_experiments()]
                running = client.search_runs(experiments, "tags.`mlflow.parentRunId` != '' "
                                             "and attributes.status = 'RUNNING'")  # fmt: skip
    assert running, f"no job seen: {finish(process)[2][-2000:]}"
    os.killpg(process.pid, signum)
    returncode, _, err = finish(process, timeout=300)
    assert returncode == code and "Traceback" not in err, err[-3000:]
    assert "the sweep's parent run" in err and "ended KILLED" in err, err[-3000:]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def kind(run) -> str:
        return run.data.tags.get("gdlab.kind") or run.data.tags.get("gdlab.role") or "job"

    kinds = sorted((kind(run), run.info.status) for run in runs)
    assert kinds == [("job", "KILLED"), ("sweep", "KILLED")], kinds


@pytest.mark.parametrize("tracking", ["local", "none"])
def test_a_ctrl_c_between_multirun_jobs_is_one_line_exit_130_and_a_killed_parent(tmp_path: Path, tracking):
    """Ctrl-C after a job of `gdlab-train -m` ended and before the next began (Hydra's own code, outside any
    job's handler): the parent run ends KILLED without a refit (Hydra's `finally` hands the callback the
    KeyboardInterrupt) and the command says so in one line and exits 130; it printed a traceback, exit 1."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the callback's module (tests/)
    done = gdlab("gdlab-train", "-m", "optimizer.lr=0.1,0.2", "trainer.max_epochs=5", f"tracking={tracking}",
                 "+hydra.callbacks.stop._target_=interrupting_callback.SigintAfterFirstJob", cwd=tmp_path,
                 env=env)  # fmt: skip
    returncode, out, err = finish(done)
    assert returncode == 130 and "Traceback" not in err, err[-3000:]
    assert out.count("objective train/loss") == 1  # the second job never ran
    if tracking == "none":
        assert err.strip().splitlines()[-1] == "gdlab-train: interrupted by SIGINT"
        return
    assert "interrupted by SIGINT: the sweep's parent run" in err and "ended KILLED" in err, err[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = sorted((run.data.tags.get("gdlab.kind", "job"), run.info.status) for run in runs)
    assert kinds == [("job", "FINISHED"), ("sweep", "KILLED")], kinds


@pytest.mark.slow
def test_a_study_refuses_another_experiment_from_either_sweep_path(tmp_path: Path):
    one_trial = ["--n-trials", "1", "tracking=none"]
    code, _, err = finish(gdlab("gdlab-sweep", "lr_depth", "trainer.max_epochs=5", *one_trial, cwd=tmp_path))
    assert code == 0, err[-2000:]
    code, out, err = finish(
        gdlab("gdlab-sweep", "lr_depth", "trainer.max_epochs=7", *one_trial, cwd=tmp_path)
    )
    assert code == 2 and "Traceback" not in err and "trial " not in out
    assert "trainer.max_epochs=7 here, 5 in the study" in err and "--study" in err, err
    # gdlab-train -m through gdlab's engine (budget 2: one more), and Hydra's Optuna sweeper (one more)
    fronts = [["hydra.sweeper.n_trials=2"], ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=1"]]
    for hydra in (["-m", "+sweep=lr_depth", "tracking=none", *front] for front in fronts):
        code, _, err = finish(
            gdlab("gdlab-train", *hydra, "trainer.max_epochs=7", "dataset.noise=0.3", cwd=tmp_path)
        )
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert "dataset.noise=0.3 here, 0.2 in the study; trainer.max_epochs=7 here, 5 in the study" in err
        code, _, err = finish(gdlab("gdlab-train", *hydra, "trainer.max_epochs=5", cwd=tmp_path))
        assert code == 0, err[-2000:]  # either front writes and checks the same signature: it joins
    other = ["lr_depth", "trainer.max_epochs=7", *one_trial, "--study", "other"]
    code, _, err = finish(gdlab("gdlab-sweep", *other, cwd=tmp_path))
    assert code == 0, err[-2000:]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert len(optuna.load_study(study_name="lr_depth", storage=storage).trials) == 3


def start_long_training(cwd: Path) -> subprocess.Popen:
    """A tracked gdlab-train in its own process group, returned once it has trained a while."""
    process = gdlab("gdlab-train", "dataset=xor", "trainer.max_epochs=200000", "tracking.plots=false",
                    cwd=cwd, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((cwd / "outputs").glob("*/*/history.csv")):
        time.sleep(0.5)
    time.sleep(2)
    return process


@pytest.mark.slow
def test_kill_9_keeps_every_finished_epoch_and_the_next_command_ends_the_run_killed(tmp_path: Path):
    process = start_long_training(tmp_path)
    os.killpg(process.pid, signal.SIGKILL)  # gdlab-train and its metric writer, no cleanup at all
    process.wait()
    history = pd.read_csv(next((tmp_path / "outputs").glob("*/*/history.csv")))
    assert len(history) > 100 and list(history["epoch"]) == list(range(len(history)))  # every epoch, in order
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (dead,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert dead.info.status == "RUNNING" and dead.data.tags["gdlab.pid"] == str(process.pid)

    code, _, err = finish(gdlab("gdlab-train", "dataset=moons", "trainer.max_epochs=2", cwd=tmp_path))
    assert code == 0 and "ended 1 MLflow run(s) left RUNNING by dead processes" in err, err[-2000:]
    repaired = client.get_run(dead.info.run_id)
    assert repaired.info.status == "KILLED"
    assert repaired.data.tags["failure.reason"] == f"its process ({process.pid}) died"


@pytest.mark.slow
def test_ctrl_c_ends_gdlab_train_killed_with_a_message_and_exit_130(tmp_path: Path):
    process = start_long_training(tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    code, _, err = finish(process, timeout=300)
    assert code == 130 and "interrupted by SIGINT (Ctrl-C); the run ended KILLED" in err, err[-3000:]
    assert "Traceback" not in err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    history = pd.read_csv(next((tmp_path / "outputs").glob("*/*/history.csv")))
    assert run.info.status == "KILLED" and run.data.metrics["final/epochs"] == len(history) > 10


def test_a_run_whose_every_line_search_failed_is_flagged(tmp_path: Path):
    import gdlab
    from gdlab.train import summary

    never = ["optimizer=backtracking", "optimizer.lr=1e6", "optimizer.lr_max=1e6",
             "optimizer.max_backtracks=0", "trainer.max_epochs=5", f"tracking.dir={tmp_path / 'mlruns'}",
             "tracking.plots=false"]  # fmt: skip
    result = gdlab.run(never)
    assert result.final["ls_failures"] == 5 and result.final["ls_all_failed"] is True
    assert "warning: every line search failed" in summary(result)
    client = MlflowClient(tracking_uri=result.final["tracking_uri"])
    tags = client.get_run(result.final["mlflow_run_id"]).data.tags
    assert tags["gdlab.warning"].startswith("every line search failed")
    moving = gdlab.run([*never[:1], "trainer.max_epochs=5", "tracking=none"])
    assert moving.final["ls_all_failed"] is False and "warning:" not in summary(moving)


@pytest.mark.parametrize("store", ["a-file-not-a-folder", "corrupt"])
def test_an_unusable_store_is_one_line_and_exit_3_before_training(tmp_path: Path, store):
    folder = tmp_path / "mlruns"
    if store == "corrupt":
        folder.mkdir()
        (folder / "mlflow.db").write_text("this is not a database\n" * 50)
    else:
        folder.write_text("a file where the store's folder should be\n")
    for command, args in (
        ("gdlab-train", ["trainer.max_epochs=3"]),
        ("gdlab-sweep", ["lr", "--n-trials", "1"]),
    ):
        code, out, err = finish(gdlab(command, *args, "tracking.dir=mlruns", cwd=tmp_path))
        assert code in (2, 3) and "Traceback" not in err, (command, err[-3000:])
        assert len(err.strip().splitlines()) == 1 and "error:" in err, (command, err)
        assert "final:" not in out and "trial " not in out


def test_a_postgresql_database_that_does_not_exist_is_one_line_at_once(tmp_path: Path):
    """MLflow's engine retries for about 100 s; gdlab asks once (10 s at most) and says why."""
    from conftest import postgres_available

    if not postgres_available():
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    uri = "postgresql+psycopg://postgres@127.0.0.1:5432/gdlab_no_such_database"
    started = time.monotonic()
    code, out, err = finish(gdlab("gdlab-train", "trainer.max_epochs=3", cwd=tmp_path,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": uri}))  # fmt: skip
    assert code == 3 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"gdlab-train: error: cannot reach the MLflow tracking "
                                                   f"backend at {uri}: connection failed")  # fmt: skip
    assert 'database "gdlab_no_such_database" does not exist' in err
    assert time.monotonic() - started < 60  # not MLflow's ~100 s of retries


@pytest.mark.slow
def test_a_live_run_in_another_pid_namespace_is_not_taken_for_dead(tmp_path: Path):
    """A container with host networking or a pod: the same hostname, its own pids."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    command = ["unshare", "--pid", "--fork", "--mount-proc", str(BIN / "gdlab-train"), "dataset=xor",
               "trainer.max_epochs=200000", "tracking.plots=false"]  # fmt: skip
    process = warm.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for_history(tmp_path, process, rows=50)
    except AssertionError:
        if process.poll() is not None and "unshare" in process.stderr.read():
            pytest.skip("no new pid namespace here (unshare needs CAP_SYS_ADMIN)")
        raise
    try:
        from gdlab.repair import PID_NAMESPACE_TAG, repair_dead_runs

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
        assert int(run.data.tags["gdlab.pid"]) < 10  # its pid inside its own namespace
        assert run.data.tags[PID_NAMESPACE_TAG] != os.readlink("/proc/self/ns/pid")
        assert repair_dead_runs(client) == 0  # what this process cannot judge, it leaves alone
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        finish(process, timeout=300)
    assert client.get_run(run.info.run_id).info.status == "KILLED"  # ended by its own process


WRITER_SCRIPT = """
import sys
import gdlab
overrides = ["dataset=xor", f"trainer.max_epochs={sys.argv[2]}", "tracking.plots=false",
             "tracking.flush_seconds=0.1", f"tracking.dir={sys.argv[1]}"]
# A first run (another experiment) returns once its record is written: the writer has started, so it
# writes the population's rows from its first epochs on, well before its training ends.
gdlab.run([*overrides, "trainer.max_epochs=1", "tracking.experiment=ready"])
results = gdlab.run(overrides, population=[{"optimizer.lr": lr} for lr in (0.05, 0.1, 0.2)])
print(" ".join(r.final["mlflow_run_id"] for r in results))
print(" ".join(str(len(r.history)) for r in results))
"""


def process_state(pid: int) -> str | None:
    """A process' state letter (R, S, T, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def writer_of(process) -> int | None:
    """The pid of the metric writer child of `process`, once it runs (by its command line, or by its name
    where a warm-started command's zygote forked it: warm_server.start_zygote)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            named = b"gdlab.writer_process" in cmdline or stat.startswith(f"{entry.name} (writer_process)")
            if int(stat.rsplit(")", 1)[1].split()[1]) == process.pid and named:
                return int(entry.name)
    return None


def start_and_kill_the_writer(tmp_path: Path, epochs: int, client) -> tuple[object, bool]:
    """The population script's process, and whether its writer was killed (kill -9) mid-training: not when
    it trained to its end before the test saw its writer write (a loaded machine, a fast population)."""
    script = tmp_path / "population.py"
    script.write_text(WRITER_SCRIPT)
    process = warm.Popen([sys.executable, str(script), str(tmp_path / "mlruns"), str(epochs)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, writer, written = time.monotonic() + 300, None, 0
    while time.monotonic() < deadline and process.poll() is None and not written:
        writer = writer or writer_of(process)
        experiment = (
            client.get_experiment_by_name("xor") if (tmp_path / "mlruns" / "mlflow.db").exists() else None
        )
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        written = sum(len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs)
        time.sleep(0.1)
    if process.poll() is not None:
        return process, False
    assert writer is not None and written > 0, "the writer never wrote"
    process.send_signal(signal.SIGSTOP)  # held while its writer dies: mid-training, however fast it trains
    try:
        if process_state(writer) in (None, "Z", "X"):  # it had ended: the training too, already
            return process, False
        os.kill(writer, signal.SIGKILL)
        while process_state(writer) not in (None, "Z", "X"):  # dead (a zombie until its parent runs)
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGCONT)
    return process, True


@pytest.mark.slow
def test_a_dead_metric_writer_costs_no_metric_and_no_false_finished(tmp_path: Path):
    """kill -9 of the writer child alone (an OOM kill): the training process writes the record itself."""
    for epochs in (2000, 8000, 32000):  # longer where the training outran the test's first look
        folder = tmp_path / str(epochs)
        folder.mkdir()
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        process, killed = start_and_kill_the_writer(folder, epochs, client)
        code, out, err = finish(process, timeout=600)
        if killed:
            break
    assert killed, "the training always ended before the test could kill its writer"
    assert code == 0, err[-3000:]
    run_ids, lengths = (line.split() for line in out.strip().splitlines()[-2:])
    assert "the metric writer process died" in err
    for run_id, epochs in zip(run_ids, map(int, lengths), strict=True):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(epochs + 1))  # every epoch once, and the final value: none lost
        assert run.data.metrics["final/epochs"] == epochs
        assert run.data.tags["gdlab.writer"].startswith("died")


@pytest.mark.slow
@pytest.mark.alone
def test_a_worker_suspended_past_the_grace_period_costs_only_its_trial(tmp_path: Path):
    """SIGSTOP (scontrol suspend, a paused VM) of one of two processes on a study: the other fails its trial
    by heartbeat and goes on; the resumed one ends that trial's run KILLED, says so, and goes on with new
    trials. Trial by trial (--population 1): with batches, the first process to ask trains its share of the
    budget as one batch; test_kill_9_of_a_worker_mid_trial_is_failed_retried_and_repaired fails a dead
    process's batch by heartbeat.
    Two invocations started together, both warm: they reach their first trials within moments of each other,
    so both train at once with short trials. (A --workers worker is a new interpreter that imports for
    seconds, while the command may finish the budget alone: that needed trials 4x as long.)"""
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    arguments = ["lr_depth", "trainer.max_epochs=1000", "gdlab_sweep.pruner.n_startup_trials=1000",
                 "--budget", "4", "--population", "1", "--grace-period", "4", "--heartbeat-interval", "1",
                 "--no-refit", "--progress", "0"]  # fmt: skip
    process, worker = (gdlab("gdlab-sweep", *arguments, cwd=tmp_path) for _ in range(2))
    study = wait_for_running_trials(storage, "lr_depth", process, count=2, training=True)  # both train
    stores = [tmp_path / "mlruns" / "optuna.db", tmp_path / "mlruns" / "mlflow.db"]
    suspend_holding_no_lock(worker.pid, stores)
    try:  # the other process ends its own trial, then fails the stopped one's by heartbeat and goes on
        deadline = time.monotonic() + 900  # its own trial first: minutes on a loaded machine
        while time.monotonic() < deadline and process.poll() is None and not retried_after_heartbeat(study):
            time.sleep(0.5)
        assert retried_after_heartbeat(study), "nobody failed it"
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    code, _, err = finish(process, timeout=600)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    code, _, err = finish(worker, timeout=600)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "was failed by heartbeat while its process was stopped" in err
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) >= 4  # the budget was reached: the lost trial was retried
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr_depth").experiment_id])
    taken = [r for r in runs if "was failed by heartbeat" in r.data.tags.get("failure.reason", "")]
    assert len(taken) == 1 and taken[0].info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def retried_after_heartbeat(study: optuna.Study) -> bool:
    """Whether a trial was failed by heartbeat (Optuna's retry callback added its retry): a trial that
    diverges ends FAIL too, and is not retried."""
    retried = optuna.storages.RetryFailedTrialCallback.retried_trial_number
    return any(retried(t) is not None for t in study.get_trials(deepcopy=False))


def wait_for_running_trials(
    storage: str, name: str, process, count: int, timeout: float = 300, training: bool = False
) -> optuna.Study:
    """`training`: the running trials have reported a value (their training is under way, past its start)."""
    # Its header comes once the study exists: opening the store before would race its creation.
    assert process.stdout.readline().startswith(f"gdlab-sweep: study {name!r}"), process.stderr.read()[-3000:]
    study, deadline = live_study(name, storage), time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if len([t for t in running if t.intermediate_values or not training]) >= count:
            return study
        time.sleep(0.2)
    raise AssertionError(f"never {count} trials running at once (exit status {process.poll()})")


def test_a_trial_told_by_a_live_sweep_keeps_its_run_until_its_own_process_ends_it(tmp_path: Path):
    """Sweeps sharing a study repair each other's dead trials' runs. A trial told COMPLETE or PRUNED by a
    live process has a run its metric writer has yet to end: it is not another sweep's to end KILLED (CI
    caught three sweeps started together ending FAILED and KILLED). A failed trial's run is an orphan."""
    from optuna.trial import TrialState

    from gdlab.repair import PID_TAG, PROCESS_TAG, end_runs_of_dead_trials, process_identity, process_tags

    study = optuna.create_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweep-shared")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the other sweep
    try:
        runs = {}
        for state in ("COMPLETE", "PRUNED", "FAIL"):
            trial = study.ask()
            study.tell(trial, 1.0 if state == "COMPLETE" else None, state=TrialState[state])
            tags = {**process_tags(), PID_TAG: str(other.pid), PROCESS_TAG: process_identity(other.pid),
                    "optuna.study": "shared", "optuna.trial": str(trial.number)}  # fmt: skip
            runs[state] = client.create_run(experiment_id, tags=tags).info.run_id
        assert end_runs_of_dead_trials(client, study) == 1
        status = {state: client.get_run(run_id).info.status for state, run_id in runs.items()}
        assert status == {"COMPLETE": "RUNNING", "PRUNED": "RUNNING", "FAIL": "KILLED"}
        other.kill()
        other.wait(timeout=60)
        assert end_runs_of_dead_trials(client, study) == 2  # its process died after the tell: orphans now
        for state in ("COMPLETE", "PRUNED"):
            run = client.get_run(runs[state])
            assert (run.info.status, run.data.tags["failure.reason"]) == ("KILLED", "its process died")
    finally:
        other.kill()
        other.wait(timeout=60)
