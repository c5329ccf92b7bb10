"""MLflow tracking against real stores: an SQLite file and a real `mlflow server` subprocess."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

import gdlab
import warm
from conftest import free_port, start_mlflow_server, stop_process_group

BIN = Path(sys.executable).parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("clean_tracking_env")


def sqlite_client(store: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def test_a_run_lands_completely_in_the_sqlite_store(tmp_path):
    r = gdlab.run(
        ["dataset=moons", "optimizer=backtracking", "trainer.max_epochs=25", f"tracking.dir={tmp_path}"]
    )
    client = sqlite_client(tmp_path)
    run = client.get_run(r.final["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "moons-backtracking-d1-w16-lr1-s42"
    assert client.get_experiment(run.info.experiment_id).name == "moons"

    curve = client.get_metric_history(run.info.run_id, "train/loss")
    # step k: measured at the weights after k steps; step 25 at the trained ones
    assert [m.step for m in curve] == list(range(26))
    expected = [*r.history["train/loss"], r.final["train/loss"]]
    assert [m.value for m in curve] == pytest.approx(expected, rel=1e-12)
    for key in ("train/acc", "test/loss", "test/acc"):  # the latest value is the final one
        assert len(client.get_metric_history(run.info.run_id, key)) == 26, key
        latest, final = run.data.metrics[key], run.data.metrics[f"final/{key}"]
        assert latest == final == pytest.approx(r.final[key], rel=1e-12)
    for key in ("grad_norm", "grad_norm/layer1", "grad_norm/layer2", "loss_after", "evals/total"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 25, key
    for key in ("step", "backtracks", "evals/fwd", "trial_step", "ls_failures"):
        assert client.get_metric_history(run.info.run_id, key), key  # logged when they change
    assert run.data.metrics["final/train/loss"] == pytest.approx(r.final["train/loss"], rel=1e-12)
    assert run.data.metrics["final/evals"] == r.final["evals"] == 50

    params = run.data.params
    assert params["optimizer.lr"] == "1.0" and params["model.depth"] == "1"
    assert params["optimizer.reset"] == "initial" and params["dataset.name"] == "moons"
    tags = run.data.tags
    assert (tags["dataset"], tags["optimizer"], tags["backprop"], tags["init"], tags["seed"]) == (
        "moons", "backtracking", "autograd", "torch_default", "42",
    )  # fmt: skip
    assert len(tags["git.commit"]) in (40, 7) and tags["git.dirty"] in ("true", "false")
    assert tags["version.torch"].startswith("2.") and tags["device"] == "cpu"
    assert "optimizer=backtracking" in tags["overrides"]

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "history.csv", "curves.png", "decision_boundary.png",
            "weights.pt"} <= names  # fmt: skip
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    for png in ("curves.png", "decision_boundary.png"):
        data = (local / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    history = pd.read_csv(local / "history.csv")
    assert len(history) == 25 and history["train/loss"].iloc[-1] == pytest.approx(curve[-2].value, rel=1e-12)


def test_digits_gets_a_confusion_matrix_and_long_params_do_not_fail(tmp_path):
    long_note = "x" * 9000
    r = gdlab.run(
        ["dataset=digits", "trainer.max_epochs=3", f"tracking.dir={tmp_path}", f"+note={long_note}"]
    )
    client = sqlite_client(tmp_path)
    run = client.get_run(r.final["mlflow_run_id"])
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.params["note"].startswith("xxx") and len(run.data.params["note"]) == 6000


def test_divergence_ends_the_run_failed_with_reason_and_epoch(tmp_path):
    r = gdlab.run(
        ["dataset=moons", "optimizer.lr=1e200", "trainer.max_epochs=20", f"tracking.dir={tmp_path}"]
    )
    run = sqlite_client(tmp_path).get_run(r.final["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.reason"] == "loss became NaN/inf"
    assert run.data.tags["failure.epoch"] == str(r.final["diverged_at"]) == "1"


def test_mlflow_tracking_uri_in_the_environment_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    r = gdlab.run(["dataset=xor", "trainer.max_epochs=3", f"tracking.dir={tmp_path / 'unused'}"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert client.get_run(r.final["mlflow_run_id"]).info.status == "FINISHED"
    assert not (tmp_path / "unused" / "mlflow.db").exists()


def test_passwords_appear_nowhere_in_the_store_or_outputs(tmp_path):
    secret = "s3cretPW"
    storage = f"postgresql://alice:{secret}@db.example:5432/optuna"
    for mode in (["hydra.run.dir=run"], ["-m", "optimizer.lr=0.1,1", "hydra.sweep.dir=sweep"]):
        proc = warm.run(
            [str(BIN / "gdlab-train"), "dataset=xor", "trainer.max_epochs=5", f"+storage={storage}", *mode],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert secret not in proc.stdout + proc.stderr
    assert (tmp_path / "sweep" / "multirun.yaml").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "config.yaml" for p in files)
    leaking = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaking == []
    runs = [r for r in all_runs(sqlite_client(tmp_path / "mlruns")) if "storage" in r.data.params]
    assert len(runs) == 3
    assert {r.data.params["storage"] for r in runs} == {"postgresql://alice:***@db.example:5432/optuna"}


def test_multirun_makes_one_parent_with_a_child_per_job(tmp_path):
    proc = warm.run(
        [str(BIN / "gdlab-train"), "-m", "optimizer.lr=0.01,0.1,1", "trainer.max_epochs=15",
         "hydra.sweep.dir=sweep"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = all_runs(sqlite_client(tmp_path / "mlruns"))
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.01", "0.1", "1"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    best = min(children, key=lambda r: r.data.metrics["final/train/loss"])
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.tags["best.optimizer.lr"] == best.data.params["optimizer.lr"]
    assert parent.data.metrics["best/train/loss"] == best.data.metrics["final/train/loss"]
    assert parent.data.metrics["sweep/trials"] == 3


def wait_for_metrics(
    uri: str, key: str, at_least: int, process, timeout: float = 300
) -> tuple[MlflowClient, str]:
    """Until a run of `process` has logged `at_least` values of `key` in the store at `uri`: (a client on it,
    the run id); its stderr if it exits first. A SQLite store is opened only once it exists: an MlflowClient
    on a path makes a store there at once, racing the one gdlab makes."""
    deadline, last_error, client = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} first: {process.stderr.read()[-3000:]}")
        if (
            client is None
            and uri.startswith("sqlite:///")
            and not Path(uri.removeprefix("sqlite:///")).exists()
        ):
            time.sleep(0.3)
            continue
        try:
            client = client or MlflowClient(tracking_uri=uri)
            for run in all_runs(client):
                if len(client.get_metric_history(run.info.run_id, key)) >= at_least:
                    return client, run.info.run_id
        except Exception as error:  # noqa: BLE001 (no run yet)
            last_error = error
        time.sleep(0.3)
    raise AssertionError(f"no run logged {at_least} values of {key} within {timeout} s ({last_error!r})")


@pytest.mark.slow
def test_sigterm_mid_run_ends_killed_with_the_partial_curve(tmp_path):
    proc = warm.Popen(
        [str(BIN / "gdlab-train"), "dataset=xor", "trainer.max_epochs=200000", "tracking.flush_seconds=0.2",
         "hydra.run.dir=run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        client, run_id = wait_for_metrics(
            f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "train/loss", 50, proc
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert 50 <= len(history) < 200000
    curve = client.get_metric_history(run_id, "train/loss")
    assert len(curve) == len(history) + 1  # everything computed before the signal, and the final value


@pytest.fixture
def mlflow_server(tmp_path):
    url, server = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts")
    yield url, server
    stop_process_group(server)


@pytest.mark.slow
def test_tracking_server_end_to_end_and_an_outage_mid_run(tmp_path, mlflow_server, monkeypatch):
    url, server = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    r = gdlab.run(["dataset=moons", "trainer.max_epochs=30", "tracking=server", f"tracking.uri={url}",
                   f"tracking.dir={tmp_path / 'local'}"])  # fmt: skip
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(r.final["mlflow_run_id"])
    assert run.info.status == "FINISHED" and r.final["tracking_outage"] is None
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 30 + 1  # and the final value
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "GDLAB_TRACKING_RETRY_SECONDS": "3"}
    train = warm.Popen(  # a server gone for good: waited out 3 s here (120 s by default), then given up
        [str(BIN / "gdlab-train"), "dataset=xor", "trainer.max_epochs=6000", "tracking=server",
         f"tracking.uri={url}", "tracking.flush_seconds=0.2", "hydra.run.dir=run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        wait_for_metrics(url, "train/loss", 100, train)
        stop_process_group(server)  # the server dies mid-run
        stdout, stderr = train.communicate(timeout=300)
    finally:
        train.kill()
    assert train.returncode == 0, stderr
    assert "tracking outage" in stdout
    assert "epochs=6000 " in stdout
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history["epoch"]) == list(range(6000))


def test_unreachable_server_at_start_is_one_clear_error_before_training(tmp_path):
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = warm.run(
        [str(BIN / "gdlab-train"), "tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}",
         "hydra.run.dir=run"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "gdlab-train: error: cannot reach the MLflow tracking backend at http://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and "final:" not in proc.stdout


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql+psycopg://alice:pw@h:5432/db", "postgresql+psycopg://alice:***@h:5432/db"),
        (r"+s=postgresql\://alice\:pw@h\:5432/db", r"+s=postgresql\://alice\:***@h\:5432/db"),  # Hydra's log
        ("a http://u:p@x and https://v:q@y", "a http://u:***@x and https://v:***@y"),
        ("http://127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),  # a port is not a password
        ("sqlite:////tmp/a:b.db", "sqlite:////tmp/a:b.db"),
        ("postgresql://u:pa/ss:w@rd@h:5432/db", "postgresql://u:***@h:5432/db"),  # "/", ":" and "@" in it
        ("redis://:pw@h/0", "redis://:***@h/0"),  # a password without a user
        (
            "postgresql://u@h/db?sslmode=require&password=p%20q&x=1",
            "postgresql://u@h/db?sslmode=require&password=***&x=1",
        ),  # libpq's query parameter
        ("mysql://h/db?user=u&passwd=pq", "mysql://h/db?user=u&passwd=***"),
        ("host=h password=pq dbname=d", "host=h password=*** dbname=d"),  # a libpq key=value string
        (r"tracking.uri=http\://u\:p\@q@h\:5000", r"tracking.uri=http\://u\:***@h\:5000"),
        ("bypass=1 compass=2", "bypass=1 compass=2"),
        ("postgresql://u@h/db?password=pa,ss;x&y=1", "postgresql://u@h/db?password=***&y=1"),
        ("?sslpassword=k&client_secret=s", "?sslpassword=***&client_secret=***"),
    ],
)
def test_mask_passwords(text, masked):
    from gdlab.masking import mask_passwords

    assert mask_passwords(text) == masked


SECRET_URLS = [
    "postgresql://u:s3cr et@h/db",  # a space in the password
    "postgresql+psycopg://u@h/db?password=p4ss#w0rd",  # SQLAlchemy keeps the "#"
    "postgresql://h/db?pass%77ord=zz9secret",  # a percent-encoded key
    "mysql://u:s3cr%40t@h/db",  # an encoded "@"
    "http://u:pa/ss:w@rd@127.0.0.1:5000",
]


@pytest.mark.parametrize("url", SECRET_URLS)
@pytest.mark.parametrize("form", ["{url}", "tracking.uri={url}", "++hydra.sweeper.storage={url}"])
def test_what_sqlalchemy_and_urllib_read_as_a_secret_is_masked(url, form):
    """The secrets as the libraries that read these URLs parse them, none left in the masked text."""
    from urllib.parse import urlsplit

    from sqlalchemy.engine import make_url

    from gdlab.masking import mask_passwords

    parsed = make_url(url)
    secrets = {parsed.password, urlsplit(url).password}
    secrets |= {value for key, value in parsed.query.items() if "pass" in key or "secret" in key}
    secrets = {s for s in secrets if s}
    assert secrets, url
    masked = mask_passwords(form.format(url=url))
    for secret in secrets:
        assert str(secret) not in masked, (secret, masked)
    assert "***" in masked


@pytest.mark.slow
def test_a_tracking_server_restart_mid_run_loses_nothing(tmp_path, monkeypatch):
    """A server restart (here ~10 s: a new `mlflow server` on the same port and store) is waited out: every
    run ends FINISHED with every epoch, not RUNNING with what came before the restart. The training is
    held (SIGSTOP) while the server goes down, so the outage begins mid-run however fast it trains; it may
    end before the new server is up, and then its last rows wait out the outage."""
    port = free_port()
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts"
    url, server = start_mlflow_server(backend, artifacts, port=port)
    script = tmp_path / "population.py"
    script.write_text(
        "import sys, gdlab\n"
        "results = gdlab.run(['dataset=xor', 'trainer.max_epochs=1500', 'tracking=server',\n"
        "                     'tracking.plots=false', f'tracking.uri={sys.argv[1]}',\n"
        "                     'tracking.flush_seconds=0.2'],\n"
        "                    population=[{'optimizer.lr': lr} for lr in (0.05, 0.1)])\n"
        "print(' '.join(r.final['mlflow_run_id'] for r in results))\n"
        "print(' '.join(str(len(r.history)) for r in results))\n"
        "print([r.final['tracking_outage'] for r in results])\n"
    )
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    train = warm.Popen([sys.executable, str(script), url], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_metrics(url, "train/loss", 50, train)
        train.send_signal(signal.SIGSTOP)
        try:
            stop_process_group(server)  # the restart: down, then up again on the same port and store
        finally:
            train.send_signal(signal.SIGCONT)
        url, server = start_mlflow_server(backend, artifacts, port=port)
        stdout, stderr = train.communicate(timeout=600)
    finally:
        train.kill()
        stop_process_group(server)
    assert train.returncode == 0, stderr[-3000:]
    run_ids, lengths, outages = stdout.strip().splitlines()[-3:]
    assert outages == "[None, None]"
    client = MlflowClient(tracking_uri=backend)  # the server's store itself, read with the servers gone
    for run_id, epochs in zip(run_ids.split(), map(int, lengths.split()), strict=True):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(epochs + 1))  # every epoch once, and the final value


def test_a_new_sqlite_store_is_made_by_another_process_and_an_existing_one_opened_in_a_thread(tmp_path):
    import sqlite3
    import threading

    from gdlab import stores

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    stores.open_in_background(uri)
    maker = next(o for o in stores._OPENING[uri] if isinstance(o, subprocess.Popen))
    assert maker.wait(timeout=300) == 0
    with sqlite3.connect(tmp_path / "new" / "mlflow.db") as db:  # MLflow's tables, made over there
        tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
        head = db.execute("select version_num from alembic_version").fetchall()
    assert {"runs", "metrics", "experiments", "alembic_version"} <= tables and len(head) == 1
    client = stores.mlflow_client(uri)
    assert uri not in stores._OPENING
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "x", 1.5)
    assert client.get_run(run.info.run_id).data.metrics == {"x": 1.5}

    again = uri.replace("/new/", "/new/./")  # the same file, not yet opened by that URI
    stores.open_in_background(again)
    assert [type(o) for o in stores._OPENING[again]] == [threading.Thread]
    assert stores.mlflow_client(again).get_run(run.info.run_id).data.metrics == {"x": 1.5}


def store_state(database: Path) -> tuple | None:
    """None (no file) or the alembic revisions a read-only look at the file finds (none: being made)."""
    import sqlite3

    if not database.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        try:
            return tuple(db.execute("select version_num from alembic_version").fetchall())
        except sqlite3.OperationalError:  # no such table yet
            return ()


def test_a_new_sqlite_store_appears_whole_to_whoever_opens_it_meanwhile(tmp_path):
    """The MLflow UI or a script opening the path while gdlab makes the store finds no file, or MLflow's
    tables at their head revision: never a store halfway through its migrations."""
    from gdlab import stores

    database = tmp_path / "mlflow.db"
    stores.open_in_background(f"sqlite:///{database}")
    maker = next(o for o in stores._OPENING[f"sqlite:///{database}"] if isinstance(o, subprocess.Popen))
    seen = []
    while True:
        made = maker.poll() is not None
        seen.append(store_state(database))
        if made:
            break
    assert maker.returncode == 0
    states = [state for state in seen if state is not None]
    assert states and len(set(states)) == 1 and len(states[0]) == 1  # the head revision, every time
    stores.wait_for_opening(f"sqlite:///{database}")


MAKE_STORE_THEN_WAIT = """
import sys, time
from gdlab import stores
stores.open_in_background(sys.argv[1])
print(next(o for o in stores._OPENING[sys.argv[1]] if hasattr(o, "pid")).pid, flush=True)
time.sleep(600)
"""


def test_sigterm_to_the_group_while_a_new_store_is_made_leaves_a_whole_store(tmp_path):
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = warm.Popen([sys.executable, "-c", MAKE_STORE_THEN_WAIT, uri], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    maker = int(command.stdout.readline())
    os.killpg(command.pid, signal.SIGTERM)  # the command's group, as systemd or SLURM would
    assert command.wait(timeout=60) == -signal.SIGTERM
    deadline = time.monotonic() + 300
    while Path(f"/proc/{maker}").exists() and time.monotonic() < deadline:  # the maker finishes its work
        time.sleep(0.1)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        (revision,) = db.execute("select version_num from alembic_version").fetchone()
    client = MlflowClient(tracking_uri=uri)  # MLflow itself accepts the store: its schema is at head
    assert [e.name for e in client.search_experiments()] == ["Default"] and revision


@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt, "KILLED"), (MemoryError, "FAILED")])
def test_runs_made_for_a_batch_that_stops_before_training_are_ended(tmp_path, monkeypatch, stop, status):
    """Ctrl-C (or an error) between creating a population's runs and its first epoch: no run left RUNNING."""
    import gdlab.fit

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(gdlab.fit, "make_loader", stopped)  # the last step before training
    with pytest.raises(stop):
        gdlab.run(
            ["trainer.max_epochs=5", f"tracking.dir={tmp_path}"], population=[{"seed": s} for s in (1, 2, 3)]
        )
    runs = all_runs(sqlite_client(tmp_path))
    assert len(runs) == 3 and {r.info.status for r in runs} == {status}
    assert all(r.data.tags["failure.reason"].startswith("before training: ") for r in runs)


def test_a_ctrl_c_while_the_store_makes_a_batch_of_runs_ends_every_run_made(tmp_path, monkeypatch):
    """A real SIGINT (a notebook's interrupt) once the store has committed members 2..P in one transaction,
    before their ids reached gdlab: those runs used to stay RUNNING; now every run made ends KILLED."""
    import gdlab.run_store

    create_runs, made = gdlab.run_store.create_runs, []

    def create_then_interrupt(*args, **kwargs):
        made.extend(create_runs(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(gdlab.run_store, "create_runs", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        gdlab.run(
            ["trainer.max_epochs=5", f"tracking.dir={tmp_path}"], population=[{"seed": s} for s in range(4)]
        )
    runs = all_runs(sqlite_client(tmp_path))
    assert len(made) == 3 and {run.info.run_id for run in runs} >= set(made)
    assert len(runs) == 4 and {run.info.status for run in runs} == {"KILLED"}
    assert {run.data.tags["failure.reason"] for run in runs} == {"before training: interrupted by SIGINT"}


def test_a_batch_stopped_before_training_with_its_writer_dead_still_ends_its_runs(tmp_path, monkeypatch):
    """The metric writer killed (the OOM killer) and then a Ctrl-C before the first epoch: the runs' ends,
    handed to the dead writer, are written by the training process instead of leaving the runs RUNNING."""
    import gdlab.fit
    from gdlab.metric_writer import MetricWriter

    def writer_killed_then_ctrl_c(*args, **kwargs):
        (writer,) = [w for uri, w in MetricWriter._instances.items() if str(tmp_path) in uri]
        writer.process.kill()
        writer.process.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(gdlab.fit, "make_loader", writer_killed_then_ctrl_c)  # the last step before training
    with pytest.raises(KeyboardInterrupt):
        gdlab.run(
            ["trainer.max_epochs=5", f"tracking.dir={tmp_path}"], population=[{"seed": s} for s in (1, 2, 3)]
        )
    runs = all_runs(sqlite_client(tmp_path))
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags["failure.reason"] for r in runs} == {"before training: interrupted by SIGINT"}


@pytest.mark.parametrize("population", [1, 3])
@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt, "KILLED"), (MemoryError, "FAILED")])
def test_a_run_whose_start_is_interrupted_after_its_creation_is_ended(tmp_path, monkeypatch, stop, status,
                                                                      population):  # fmt: skip
    """Ctrl-C (or an error) after MLflow made the run but before its caller holds it (its writer starting,
    its params being logged): the run ends with the reason, not RUNNING."""
    import gdlab.tracking

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(gdlab.tracking.MetricWriter, "for_uri", stopped)
    with pytest.raises(stop):
        gdlab.run(["trainer.max_epochs=5", f"tracking.dir={tmp_path}"],
                  population=[{"seed": s} for s in range(population)])  # fmt: skip
    (run,) = all_runs(sqlite_client(tmp_path))  # a population's first run is made alone, before the rest
    assert run.info.status == status and run.info.end_time is not None
    assert run.data.tags["failure.reason"].startswith("before training: ")


@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt, "KILLED"), (MemoryError, "FAILED")])
def test_a_batch_stopped_while_its_record_is_written_ends_the_runs_not_yet_closed(tmp_path, monkeypatch, stop,
                                                                                  status):  # fmt: skip
    """Ctrl-C (or an error) after training, while the members' records are written one by one (a refit's
    model being logged, say): the runs already closed keep their state, the rest end with the reason
    instead of staying RUNNING."""
    import gdlab.fit

    written = []

    def save_then_stop(*args, **kwargs):
        if written:
            raise stop()
        written.append(gdlab.fit.save_outputs.__wrapped__(*args, **kwargs))

    save_then_stop.__wrapped__ = gdlab.fit.save_outputs
    monkeypatch.setattr(gdlab.fit, "save_outputs", save_then_stop)
    with pytest.raises(stop):
        gdlab.run(
            ["trainer.max_epochs=5", f"tracking.dir={tmp_path}"], population=[{"seed": s} for s in range(3)]
        )
    runs = sorted(all_runs(sqlite_client(tmp_path)), key=lambda run: run.info.start_time)
    assert [run.info.status for run in runs].count("FINISHED") == 1
    stopped = [run for run in runs if run.info.status != "FINISHED"]
    assert [run.info.status for run in stopped] == [status, status]
    assert all(run.data.tags["failure.reason"].startswith("while recording: ") for run in stopped)


def test_an_interrupted_command_ends_the_runs_it_left_running_and_no_others(tmp_path):
    from gdlab.repair import PID_TAG, PROCESS_TAG, end_runs_of_this_process, process_tags

    client = sqlite_client(tmp_path)
    experiment = client.create_experiment("e")
    mine, other = process_tags(), {**process_tags(), PID_TAG: "1", PROCESS_TAG: "1:1"}
    left = client.create_run(experiment, tags=mine).info.run_id
    ended = client.create_run(experiment, tags=mine).info.run_id
    client.set_terminated(ended, status="FINISHED")
    anothers = client.create_run(experiment, tags=other).info.run_id
    assert end_runs_of_this_process(client, experiment, "interrupted by SIGTERM") == 1
    assert client.get_run(left).info.status == "KILLED"
    assert client.get_run(left).data.tags["failure.reason"] == "interrupted by SIGTERM"
    assert client.get_run(ended).info.status == "FINISHED"
    assert client.get_run(anothers).info.status == "RUNNING"


@pytest.mark.parametrize("moment", [("after_cursor_execute", n) for n in range(1, 7)] + [("commit", 1)])
def test_a_signal_inside_a_store_transaction_comes_after_it_and_the_cleanup_can_write(tmp_path, moment):
    """SIGTERM while the command's process is inside one of MLflow's SQLite sessions (after its n-th
    statement, or at its commit): the handler's exception used to leave the session's connection open while
    the cleanup, in the except block as the commands do, ended the run: "database is locked" after SQLite's
    20 s wait (CI: a sweep's parent left RUNNING). Now the session completes, the signal arrives right after
    it, and the cleanup writes."""
    from sqlalchemy import event

    from gdlab.interrupts import Interrupted, InterruptHandler
    from gdlab.stores import mlflow_client

    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    name, nth = moment
    seen = []

    def signal_mid_session(*args):
        seen.append(name)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGTERM)

    engine = client._tracking_client.store.engine
    event.listen(engine, name, signal_mid_session)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    handler = InterruptHandler().install()
    try:
        with pytest.raises(Interrupted):
            try:
                client.set_tag(run_id, "during", "the signal")
            except Interrupted:
                client.set_terminated(run_id, status="KILLED")
                raise
    finally:
        event.remove(engine, name, signal_mid_session)
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert len(seen) >= nth and handler.signum == signal.SIGTERM
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["during"] == "the signal"  # the session the signal arrived in completed


def test_the_metric_writer_ignores_a_signal_that_comes_while_it_starts(tmp_path):
    """Ctrl-C or SIGTERM to the group while the writer's interpreter still imports (before it could set
    them to be ignored) used to kill it with a KeyboardInterrupt traceback on the command's stderr. It now
    starts with them blocked, ignores them, and ends normally when its input ends."""
    from gdlab.metric_writer import MetricWriter

    writer = MetricWriter(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(writer.process.pid, signum)  # right after the fork: its interpreter has not started
    writer.used = True  # close it as one that holds a record: by ending its input, not by killing it
    writer.close()
    assert writer.process.returncode == 0


def test_ending_a_parent_early_leaves_one_that_finished_meanwhile_alone(tmp_path, monkeypatch):
    """A signal that arrives as the sweep's parent was just ended FINISHED (its last write) must not turn
    its complete record into KILLED; the runs this process left RUNNING are still ended."""
    from omegaconf import OmegaConf

    from gdlab.repair import process_tags
    from gdlab.sweep.parent_run import end_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = OmegaConf.create({"tracking": {"backend": "local", "dir": str(tmp_path)}})
    client = sqlite_client(tmp_path)
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment, tags=process_tags()).info.run_id
    left = client.create_run(experiment, tags=process_tags()).info.run_id
    client.set_terminated(parent, status="FINISHED")
    end_parent_run(cfg, parent, "KILLED", "interrupted by SIGTERM")
    assert client.get_run(parent).info.status == "FINISHED"
    assert "failure.reason" not in client.get_run(parent).data.tags
    assert client.get_run(left).info.status == "KILLED"
