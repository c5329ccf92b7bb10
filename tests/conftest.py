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


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first, spread over both halves of the list: `make test`'s 2 workers each
    begin with a half (pytest-xdist's worksteal) and take the other's last tests when done, so the suite
    ends on short tests instead of one worker idling while the other runs a long one."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    modules: dict[str, list] = {}  # the others module by module: a module's fixtures are made once
    for item in items:
        if not item.get_closest_marker("slow"):
            modules.setdefault(item.module.__name__, []).append(item)
    halves = ([], [])
    for index, module in enumerate(modules.values()):
        halves[index % 2].extend(module)
    items[:] = slow[0::2] + halves[0] + slow[1::2] + halves[1]


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
    stop_process_group.

    Cheaper than the default start (~5 s of CPU against ~15 s on 2 cores), nothing gdlab talks to left out:
    one uvicorn worker (it serves concurrent requests in threads), no job runner (MLflow's GenAI jobs, seven
    huey consumers; gdlab runs none), and a new SQLite store made as gdlab makes one (a copy of the store
    MLflow's migrations make, tests/test_new_store.py) instead of by the server's ~50 migrations."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    if backend_store_uri.startswith("sqlite:///"):
        from gdlab.new_store import make_sqlite_store

        database = Path(backend_store_uri[len("sqlite:///") :])
        if not database.exists():
            database.parent.mkdir(parents=True, exist_ok=True)
            make_sqlite_store(database)
    port = port or free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(artifacts_destination)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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


def suspend_holding_no_lock(pid: int, databases: list) -> None:
    """SIGSTOP `pid` at a moment it is not inside a write to a SQLite file: a process stopped there holds
    the file's lock, and every process on the file waits for it (SQLite's, see the README). For tests about
    a process stopped anywhere else; an AssertionError if it held a lock at every try for 300 s."""
    import contextlib
    import os
    import signal
    import sqlite3
    import time
    from pathlib import Path

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)
        try:
            for database in databases:  # a write needs every other process out of the file
                if not Path(database).exists():  # not made yet: nobody writes it
                    continue
                with contextlib.closing(sqlite3.connect(database, timeout=1)) as connection:
                    version = connection.execute("PRAGMA user_version").fetchone()[0]
                    connection.execute(f"PRAGMA user_version = {version}")
            return
        except sqlite3.OperationalError:  # locked: the stopped process holds it
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
    raise AssertionError(f"process {pid} held a SQLite lock every time it was stopped")
