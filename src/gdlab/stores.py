"""Opening MLflow stores: one `MlflowClient` per process and URI, and a new SQLite store made while the
caller goes on.

A new SQLite store is made by a separate process (`python -m gdlab.stores URI`: gdlab.new_store, under the
store's lock), so that making it never holds this process's GIL against its own imports; an existing one is
opened in a thread. `mlflow_client` waits for either. The first client a process opens on a store also ends
the runs that dead gdlab processes of this host left RUNNING (gdlab.repair).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from gdlab.interrupts import whole
from gdlab.new_store import make_sqlite_store
from gdlab.repair import repair_dead_runs

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from a lab tool
# gdlab shows its own progress (gdlab.progress). MLflow imports tqdm.auto (mlflow.genai, at `import mlflow`)
# and draws an artifact-upload bar with it; in a notebook without ipywidgets both say "TqdmWarning:
# IProgress not found", about a bar gdlab never shows there.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore", message="IProgress not found")
# MLflow prints "View run ... at: <tracking URI>" with any password in it; gdlab prints its own, masked.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's REST client retries 7 times with exponential backoff (minutes against a dead server);
# a training run should notice an outage within seconds and keep going. Users can still override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# gdlab says what failed in one line (gdlab.masking.error_line): MLflow's SQL store would log the same
# error with its traceback first, and its schema set-up lines on a new store.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

_CLIENTS: dict = {}
_OPENING: dict[str, list[threading.Thread | subprocess.Popen]] = {}


def mlflow_client(uri: str):
    """The MlflowClient on `uri`, one per process and URI (a new one costs ~30 ms: a sweep opens many runs).

    A SQLite store is opened (created and migrated, the first time) under a lock beside the database
    file, so processes started together on a new store don't race MLflow's schema migrations
    (alembic's "table already exists")."""
    wait_for_opening(uri)
    if uri not in _CLIENTS:
        _CLIENTS[uri] = open_client(uri)
    repair_once(_CLIENTS[uri], uri)
    return _CLIENTS[uri]


def open_in_background(uri: str | None, here: bool = True) -> None:
    """Begin opening a SQLite store (a new one in another process, see the module's doc) while the caller
    goes on importing Lightning; `mlflow_client` waits for it. A failure is left for `mlflow_client` to meet
    again and report where the store is used. `here=False`: only a new store is made (by that process), for
    a caller whose store work the metric writer does (gdlab.writer_calls): it does not import MLflow."""
    if uri is None or not uri.startswith("sqlite:///") or uri in _CLIENTS or uri in _OPENING:
        return
    if not here:
        if is_new_sqlite_store(uri):  # waited for by a thread (no zombie): the writer opens it under its lock
            threading.Thread(target=start_making(uri).wait, daemon=True, name="gdlab-new-store").start()
        return

    def open_quietly() -> None:
        with contextlib.suppress(Exception):
            _CLIENTS[uri] = open_client(uri)

    def import_mlflow() -> None:  # what this process needs anyway, while the other one migrates
        with contextlib.suppress(Exception):
            import mlflow  # noqa: F401

    opening = [start_making(uri)] if is_new_sqlite_store(uri) else []
    opening.append(threading.Thread(target=import_mlflow if opening else open_quietly, daemon=True,
                                    name="gdlab-open-store"))  # fmt: skip
    opening[-1].start()
    _OPENING[uri] = opening


def start_making(uri: str) -> subprocess.Popen:
    """The process that makes a new SQLite store (`make_new_store`)."""
    command = [sys.executable, "-m", "gdlab.stores", uri]  # a file path: no credential to hide
    # In its own session: a SIGTERM or Ctrl-C to the command's process group must not stop MLflow's
    # migrations halfway (a half-made store refuses every later command); they take seconds.
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def import_client_modules(uri: str) -> None:
    """MLflow's client and, for a database, its SQL store's modules: what opening `uri` will import (a
    process that imports them now freezes them out of its collections, gdlab.import_gc). Nothing is opened:
    an unreachable store is met where it is used."""
    with contextlib.suppress(ImportError):
        import mlflow  # noqa: F401

        if is_database(uri):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def is_new_sqlite_store(uri: str) -> bool:
    """No database file yet, or an empty one: opening it creates MLflow's tables."""
    database = Path(uri[len("sqlite:///") :])
    try:
        return database.stat().st_size == 0
    except OSError:
        return True


def wait_for_opening(uri: str) -> None:
    for opening in _OPENING.pop(uri, []):
        if isinstance(opening, subprocess.Popen):
            opening.wait()  # whatever it met, opening the store here meets again and reports
        else:
            opening.join()


def open_client(uri: str):
    from mlflow import MlflowClient

    if is_database(uri) and not uri.startswith("sqlite"):
        probe_database(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with schema_lock(uri):  # a new store's tables, made by one process at a time
        if uri.startswith("sqlite:///") and is_new_sqlite_store(uri):
            make_sqlite_store(Path(uri[len("sqlite:///") :]))
        client = MlflowClient(tracking_uri=uri)
        if is_database(uri):
            whole_sessions(client)
            client.search_experiments(max_results=1)  # opens the store (migrates a new or an old one)
    return client


def whole_sessions(client) -> None:
    """Every session of the client's SQL store runs with SIGTERM and SIGINT deferred to its end
    (gdlab.interrupts.deferred): a signal never leaves a transaction or a read open, and its lock held, while
    the command ends its runs. MLflow keeps one store per URI, so every client on `uri` shares this."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if getattr(store, "ManagedSessionMaker", None) is not None:  # not on a REST store
        store.ManagedSessionMaker = whole(store.ManagedSessionMaker)


def is_database(uri: str) -> bool:
    return uri.partition(":")[0].split("+")[0].lower() in ("sqlite", "postgresql", "mysql", "mssql")


def probe_database(uri: str, timeout: int = 10) -> None:
    """One connection to a database store, within `timeout` seconds: MLflow's own engine retries for about
    100 s before it says that a database does not exist or refuses the login."""
    import sqlalchemy

    arguments = {"connect_timeout": timeout} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=arguments)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


# pg_advisory_lock's key (any bigint; advisory locks are the database's own): "gdlab" in ASCII.
ADVISORY_KEY = 0x67646C6162


@contextlib.contextmanager
def advisory_lock(url: str):
    """PostgreSQL's advisory lock on the database at `url` while a store's tables are created: processes
    started in the same second on a new database would otherwise each create them (Optuna's and MLflow's
    schema creation is not safe against itself; one of them fails on "type ... already exists")."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
    finally:
        engine.dispose()


def schema_lock(url: str):
    """What makes opening a store safe for processes starting together: a file lock beside a SQLite file,
    an advisory lock on PostgreSQL, nothing elsewhere."""
    if url.startswith("sqlite:///"):
        return store_lock(Path(url[len("sqlite:///") :]))
    if url.startswith("postgresql"):
        return advisory_lock(url)
    return contextlib.nullcontext()


@contextlib.contextmanager
def store_lock(database: Path):
    """An exclusive lock beside a SQLite store while it is opened (none where the folder is read-only:
    then nothing can create the store either)."""
    try:
        lock = open(database.with_name(database.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_REPAIRED: set[str] = set()


def repair_once(client, uri: str) -> None:
    """The first time this process opens a store: end the runs dead gdlab processes left RUNNING."""
    if uri in _REPAIRED:
        return
    _REPAIRED.add(uri)
    try:
        repaired = repair_dead_runs(client)
    except Exception:  # housekeeping never stops the command; an unreachable store is reported later
        _REPAIRED.discard(uri)
        return
    if repaired:
        print(f"gdlab: ended {repaired} MLflow run(s) left RUNNING by dead processes of this host as KILLED",
              file=sys.stderr)  # fmt: skip


def make_new_store(uri: str) -> None:
    """open_in_background's process: make the new store (gdlab.new_store), under its lock."""
    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(database):
        if is_new_sqlite_store(uri):
            make_sqlite_store(database)


if __name__ == "__main__":
    with contextlib.suppress(Exception):
        make_new_store(sys.argv[1])
