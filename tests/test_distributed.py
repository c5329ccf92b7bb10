"""Many workers, one study: PostgreSQL-backed sweeps, a real MLflow server, kill -9, and credentials.

PostgreSQL runs at 127.0.0.1:5432 (trust auth); every test makes and drops its own databases.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
from mlflow import MlflowClient
from optuna.trial import TrialState

import warm
from conftest import ADMIN, free_port, postgres_available, start_mlflow_server, stop_process_group

BIN = Path(sys.executable).parent
PASSWORD = "s3cret-pw"  # trust auth ignores it; gdlab must never write it anywhere


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL at :5432")]


def storage_url(database: str) -> str:
    return f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{database}"


@pytest.fixture
def mlflow_server(make_database, tmp_path):
    """`mlflow server` with a PostgreSQL backend store and an artifact destination, on loopback."""
    url, server = start_mlflow_server(storage_url(make_database()), tmp_path / "server-artifacts")
    yield url
    stop_process_group(server)


def sweep(*args, cwd, env=None, timeout=900):
    return warm.run([str(BIN / "gdlab-sweep"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip


def pg_dump(database: str) -> str:
    return warm.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", database], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def test_four_workers_on_postgres_lose_and_duplicate_nothing_and_write_no_password(
    tmp_path, make_database, mlflow_server
):
    optuna_db = make_database()
    tracking = mlflow_server.replace("http://", f"http://gdlab:{PASSWORD}@")
    proc = sweep("lr_depth", "trainer.max_epochs=8", "gdlab_sweep.pruner.n_startup_trials=1000",
                 "tracking=server", f"tracking.uri={tracking}", "--budget", "16", "--workers", "4",
                 "--storage", storage_url(optuna_db), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lr_depth", storage=storage_url(optuna_db))
    trials = study.get_trials()
    assert 16 <= len(trials) <= 19  # running workers may each finish one trial past the budget
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == len(trials)

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("sweep-lr_depth")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    (refit,) = [r for r in children if r.data.tags.get("gdlab.role") == "refit"]  # the winner, on train + val
    children.remove(refit)
    by_number = {}
    for run in children:
        by_number.setdefault(int(run.data.tags["optuna.trial"]), []).append(run)
    assert sorted(by_number) == sorted(t.number for t in trials)  # none lost
    assert all(len(found) == 1 for found in by_number.values())  # none duplicated
    for trial in trials:
        run = by_number[trial.number][0]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
        assert int(run.data.params["model.depth"]) == trial.params["model.depth"]
        assert run.data.metrics["final/val/loss"] == pytest.approx(trial.value, rel=1e-12)

    # The password is nowhere: not in any database (Optuna's, the server's backend), the artifacts, the
    # outputs or the logs.
    assert PASSWORD not in proc.stdout + proc.stderr
    backend = client.get_run(parents[0].info.run_id)  # the server's own database
    assert PASSWORD not in str(backend.data.tags) + str(backend.data.params)
    assert len(make_database.names) == 2 and optuna_db in make_database.names  # and the server's backend
    for database in make_database.names:
        assert PASSWORD not in pg_dump(database), database
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]


@pytest.mark.alone
def test_kill_9_of_a_worker_mid_trial_is_failed_retried_and_repaired(tmp_path, make_database):
    storage = storage_url(make_database())
    # One experiment for both invocations (the study refuses another): long trials that the victim never
    # reports, and that the rerun's ThresholdPruner ends at their first report.
    sweeps = tmp_path / "cfg" / "sweep"
    sweeps.mkdir(parents=True)
    (sweeps / "long.yaml").write_text(
        (Path(__file__).parents[1] / "sweeps" / "lr_depth.yaml").read_text()
        .replace("_target_: optuna.pruners.MedianPruner", "_target_: optuna.pruners.ThresholdPruner")
        .replace("n_startup_trials: 5", "upper: 0.0").replace("n_warmup_steps: 30", "n_warmup_steps: 0")
        .replace("max_epochs: 300", "max_epochs: 100000")
    )  # fmt: skip
    # One batch of 3: the victim holds 3 trials when it is killed.
    heartbeat = ["--heartbeat-interval", "1", "--grace-period", "3", "--storage", storage,
                 "--population", "3", "--config-dir", str(tmp_path / "cfg")]  # fmt: skip
    victim = warm.Popen(
        [str(BIN / "gdlab-sweep"), "long", "gdlab_sweep.report_every=1000000", "--budget", "3", *heartbeat],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        # Its header comes once the study exists: loading it before would create Optuna's tables from here,
        # racing the victim's own creation (it takes an advisory lock; this process would not).
        header = victim.stdout.readline().decode()
        assert header.startswith("gdlab-sweep: study 'lr_depth'"), (
            header + victim.stderr.read().decode()[-3000:]
        )
        deadline = time.monotonic() + 120
        running = []
        while time.monotonic() < deadline and not running:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="lr_depth", storage=storage)
                running = study.get_trials(states=(TrialState.RUNNING,))
            except (KeyError, sqlalchemy.exc.SQLAlchemyError):
                pass  # the study does not exist yet, or the victim is creating Optuna's tables this moment
        assert running, "no trial started"
        # Mid-trial: the batch's first architecture group has its MLflow runs, RUNNING.
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("sweep-lr_depth")
        while time.monotonic() < deadline and not client.search_runs(
            [experiment.experiment_id], "tags.`optuna.trial` != '' and attributes.status = 'RUNNING'"
        ):  # fmt: skip
            time.sleep(0.2)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its metric writer
        victim.wait()
    killed = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]  # its whole batch
    assert len(killed) == 3
    time.sleep(4)  # past the grace period

    proc = sweep("long", "--budget", "3", *heartbeat, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lr_depth", storage=storage)
    by_number = {t.number: t for t in study.get_trials()}
    for number in killed:
        assert by_number[number].state == TrialState.FAIL
        retried = [t for t in by_number.values() if t.system_attrs.get("failed_trial") == number]
        assert len(retried) == 1 and retried[0].params == by_number[number].params
        assert retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3

    # A batch trains one architecture group after another: the group that was training has runs, and
    # they are repaired to KILLED; a group that had not started has none.
    runs = [run for number in killed for run in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`optuna.trial` = '{number}'")]  # fmt: skip
    assert runs and all(r.info.status == "KILLED" for r in runs)
    still = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert not still, proc.stdout[-2000:]


def test_sweeps_started_in_the_same_second_on_new_databases_all_run(tmp_path, make_database):
    """Three invocations at once on a new Optuna database and a new MLflow one: each store's tables are
    created once (an advisory lock), not three times at the cost of two failed starts."""
    storage, tracking = storage_url(make_database()), storage_url(make_database())
    processes = []
    for index in range(3):
        folder = tmp_path / f"invocation-{index}"
        folder.mkdir()
        processes.append(warm.Popen(
            [str(BIN / "gdlab-sweep"), "lr_depth", "trainer.max_epochs=3", "--n-trials", "1", "--no-refit",
             "--progress", "0", "--storage", storage, "tracking=local"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
        ))  # fmt: skip
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="lr_depth", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr_depth").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 6  # three parents, three trials


def test_tracking_server_down_when_the_sweep_starts(tmp_path, make_database):
    proc = sweep("lr_depth", "tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}",
                 "--budget", "2", "--storage", storage_url(make_database()),
                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3
    assert "gdlab-sweep: error: cannot reach the MLflow tracking backend at http://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and "trial 1/" not in proc.stdout


def test_a_database_that_is_not_optuna_is_refused_untouched(tmp_path, make_database):
    database = make_database()
    with psycopg.connect(ADMIN.replace("/test", f"/{database}"), autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    proc = sweep("lr_depth", "--storage", storage_url(database), cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not an Optuna database (it holds other tables: invoices)" in proc.stderr
    assert PASSWORD not in proc.stderr and "postgres:***@" in proc.stderr
    with psycopg.connect(ADMIN.replace("/test", f"/{database}")) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert tables == ["invoices"]

    garbage = tmp_path / "notes.db"
    garbage.write_text("not a database at all\n" * 100)
    proc = sweep("lr_depth", "--storage", f"sqlite:///{garbage}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a usable Optuna database" in proc.stderr
    assert garbage.read_text() == "not a database at all\n" * 100


def test_an_incompatible_schema_is_refused_untouched(tmp_path, make_database):
    database = make_database()
    optuna.storages.RDBStorage(storage_url(database))  # a real Optuna schema ...
    with psycopg.connect(ADMIN.replace("/test", f"/{database}"), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v0.1.0.a'")  # ... from a version long gone
    proc = sweep("lr_depth", "--storage", storage_url(database), cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not a usable Optuna database" in proc.stderr and "Traceback" not in proc.stderr
    with psycopg.connect(ADMIN.replace("/test", f"/{database}")) as conn:
        assert conn.execute("SELECT count(*) FROM studies").fetchone()[0] == 0


def test_two_search_spaces_on_one_study_are_refused(tmp_path, make_database):
    storage = storage_url(make_database())
    first = sweep("lr_depth", "trainer.max_epochs=5", "--budget", "1", "--study", "shared",
                  "--storage", storage, cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3  # the parent, its trial and the refit of the trial on train + val
    trial_and_parent = [r for r in runs if r.data.tags.get("gdlab.role") != "refit"]
    assert [r.data.tags["optuna.study"] for r in trial_and_parent] == ["shared", "shared"]  # --study's name
    second = sweep("optimizers", "trainer.max_epochs=5", "--budget", "2", "--study", "shared",
                   "--storage", storage, cwd=tmp_path)  # fmt: skip
    assert second.returncode == 2
    assert "study 'shared' was created by another search space" in second.stderr
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 1


def test_submitit_launcher_runs_jobs_as_processes_under_one_parent(tmp_path):
    """hydra-submitit-launcher's local executor: what gdlab_slurm does on a cluster, on this machine."""
    proc = warm.run(
        [str(BIN / "gdlab-train"), "-m", "hydra/launcher=submitit_local", "optimizer.lr=0.1,1",
         "trainer.max_epochs=5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")  # the job processes share the launcher's directory
    assert list((sweep_dir / ".submitit").glob("*")), "jobs did not go through submitit"
    assert sorted(p.name for p in sweep_dir.glob("[0-9]")) == ["0", "1"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("moons").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.1", "1"]


def test_the_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_module

    with initialize_config_module("gdlab.conf"):
        cfg = compose("config", overrides=["hydra/launcher=gdlab_slurm", "hydra.launcher.partition=cpu"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.cpus_per_task, launcher.array_parallelism) == ("cpu", 2, 16)


@pytest.mark.slow
def test_invocations_and_workers_draw_distinct_trials_on_postgres(tmp_path, make_database):
    storage = storage_url(make_database())
    quick = ["tracking=none", "trainer.max_epochs=3", "--storage", storage]
    for _ in range(3):
        proc = sweep("lr_depth", "--n-trials", "4", *quick, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = sweep("lr_depth", "--workers", "3", "--n-trials", "12", *quick, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = optuna.load_study(study_name="lr_depth", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 24
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 24


def command_lines() -> list[str]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass  # the process ended
    return lines


@pytest.mark.slow
def test_no_form_of_a_password_reaches_disk_logs_databases_or_a_command_line(tmp_path, make_database):
    odd = "Zq/9:x%40Ky"  # "/", ":" and an escaped "@" in it: the password is Zq/9:x@Ky
    secrets = ["Zq/9", "x%40Ky", "x@Ky", "Qv7-query"]
    databases = [make_database(), make_database()]
    in_userinfo = f"postgresql+psycopg://postgres:{odd}@127.0.0.1:5432/{databases[0]}"
    in_query = f"postgresql+psycopg://postgres@127.0.0.1:5432/{databases[1]}?password=Qv7-query"
    quick = ["lr_depth", "trainer.max_epochs=30", "tracking.plots=true"]
    # Its worker and writers started as new interpreters (not by warm_server's zygote): their command lines.
    env = {**os.environ, "GDLAB_OPTUNA_STORAGE": in_userinfo, "GDLAB_TEST_COLD_CHILDREN": "1"}
    workers = warm.Popen(
        [str(BIN / "gdlab-sweep"), *quick, "--budget", "4", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    while workers.poll() is None:
        seen += [line for line in command_lines() if "gdlab" in line]
        time.sleep(0.2)
    logs = workers.stdout.read()
    assert workers.returncode == 0, logs[-3000:]
    assert any("--worker" in line for line in seen)  # the worker process was seen
    proc = sweep(*quick, "--budget", "2", "--storage", in_query, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs += proc.stdout + proc.stderr
    # gdlab-train -m through gdlab's engine (a budget of 6: 2 more), then Hydra's Optuna sweeper (2 more)
    for front in (["hydra.sweeper.n_trials=6"], ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=2"]):
        hydra = warm.run([str(BIN / "gdlab-train"), "-m", "+sweep=lr_depth", "trainer.max_epochs=30", *front,
                          f"hydra.sweeper.storage='{in_userinfo}'"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert hydra.returncode == 0, hydra.stderr[-3000:]
        logs += hydra.stdout + hydra.stderr
    assert len(optuna.load_study(study_name="lr_depth", storage=in_userinfo).trials) >= 8

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name == "hydra.yaml" for p in files)
    for secret in secrets:
        assert secret not in logs
        assert not [line for line in seen if secret in line]
        assert not [str(p) for p in files if secret.encode() in p.read_bytes()], secret
        for database in databases:
            assert secret not in pg_dump(database)
