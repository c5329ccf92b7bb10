import os

import pytest

# Keep each test single-threaded and quiet: the suite runs on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def live_study(name: str, url: str):
    """An Optuna study read while gdlab's processes write it, waiting for SQLite's lock as long as gdlab
    does (60 s): pysqlite's default 5 s runs out on a loaded machine."""
    import optuna

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url, engine_kwargs=engine))


@pytest.fixture(autouse=True)
def _single_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def clean_tracking_env(monkeypatch):
    """No MLflow store or sweep parent run from the environment: each test's runs go where it says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GDLAB_MLFLOW_PARENT_RUN_ID", raising=False)


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """gdlab-sweep's main in this process, for input it refuses before any work (no process to start):
    (exit status, stderr). A traceback would surface here as the exception itself."""
    from gdlab.sweep.cli import main

    monkeypatch.chdir(tmp_path)

    def sweep(*args: str) -> tuple[int, str]:
        import signal

        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = main(list(args))
        except SystemExit as error:  # argparse's refusals
            code = error.code
        finally:
            for signum, handler in handlers.items():  # main installs gdlab's; pytest keeps its own
                signal.signal(signum, handler)
        return code, capsys.readouterr().err

    return sweep


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_store_uri: str, artifacts_destination, timeout: float = 180, port: int = 0):
    """A real `mlflow server` on a loopback port (a free one unless given): (url, process). Stop it with
    stop_process_group."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = port or free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(artifacts_destination)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url, server
        except OSError:
            time.sleep(0.5)
    stop_process_group(server)
    raise AssertionError("mlflow server did not start")


def stop_process_group(process) -> None:
    import os
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


ADMIN = "postgresql://postgres@127.0.0.1:5432/test"  # the machine's PostgreSQL, trust auth


def postgres_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture
def make_database():
    """make() -> the name of a new, empty PostgreSQL database, dropped after the test; make.names: those
    made so far (a fixture's included)."""
    import uuid

    import psycopg

    names = []

    def make() -> str:
        name = f"gdlab_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return name

    make.names = names
    yield make
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
