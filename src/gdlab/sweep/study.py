"""The Optuna study a sweep adds trials to: its storage, its heartbeats and its per-machine lock.

A trial whose process died stops sending heartbeats, goes FAIL after the grace period and is retried;
with --exclusive, one gdlab-sweep per study runs on a machine (StudyLock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path

import optuna
from optuna.trial import TrialState

from gdlab.interrupts import whole
from gdlab.masking import error_line, mask_passwords
from gdlab.stores import schema_lock
from gdlab.sweep import owned_trials
from gdlab.sweep.spec import SweepError, SweepSpec, search_space_signature

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STORAGE_ENV = "GDLAB_OPTUNA_STORAGE"
HEARTBEAT_SECONDS = 10  # a worker killed mid-trial is noticed GRACE_SECONDS later
GRACE_SECONDS = 30


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS):
    """RDB storage with heartbeats: a trial whose process died goes FAIL and is retried (twice); a population
    batch's asks do not re-read the batch (gdlab.sweep.owned_trials)."""
    whole_optuna_sessions()
    is_sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite else {"pool_pre_ping": True}
    database = Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None
    try:
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        # Processes started together on a new database create Optuna's tables once, under a lock.
        with schema_lock(url):
            check_is_optuna_database(url)
            return owned_trials.wrap(rdb_storage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            ))  # fmt: skip
    except SweepError:
        raise
    except Exception as error:
        raise SweepError(f"--storage {mask_passwords(url)} is not a usable Optuna database: "
                         f"{error_line(error)}") from error  # fmt: skip


def rdb_storage(url: str, **kwargs) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage, made once more where another process that does not take gdlab's lock (Optuna's
    own, optuna-dashboard) created Optuna's tables in the same moment: this creation then met "already
    exists" (SQLite) or "duplicate key" (PostgreSQL's types), and the tables are now there."""
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as error:  # noqa: BLE001 (SQLAlchemy's error classes differ by database)
        if not re.search(r"already exists|duplicate key", str(error), re.IGNORECASE):
            raise
        return optuna.storages.RDBStorage(url, **kwargs)


def whole_optuna_sessions() -> None:
    """Each of Optuna's RDB sessions runs with SIGTERM and SIGINT deferred to its end (gdlab.interrupts):
    a signal inside one used to keep its read open through the traceback, so the trials' FAIL, told in the
    command's cleanup, met "database is locked" and the trials stayed RUNNING. Optuna opens every session
    through this module function; where a version does not, nothing changes."""
    from optuna.storages._rdb import storage as rdb

    if callable(getattr(rdb, "_create_scoped_session", None)):
        rdb._create_scoped_session = whole(rdb._create_scoped_session)


def check_is_optuna_database(url: str) -> None:
    """Refuse, before writing anything, a database that holds tables but not Optuna's."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise SweepError(
            f"--storage {mask_passwords(url)} is not an Optuna database (it holds other tables: "
            f"{', '.join(sorted(tables)[:5])}); use an empty database or an existing Optuna one"
        )


def check_same_search_space(study: optuna.Study, spec: SweepSpec) -> None:
    signature = search_space_signature(spec)
    stored = study.user_attrs.get("gdlab.search_space")
    if stored is None:
        study.set_user_attr("gdlab.search_space", signature)
    elif stored != signature:
        raise SweepError(
            f"study {study.study_name!r} was created by another search space ({stored}); this "
            f"invocation's is {signature}. Use another --study name instead of mixing incompatible trials."
        )


class Heartbeats:
    """A thread that records a heartbeat for each of a batch's trials (what study.optimize does for one)."""

    def __init__(self, storage, trials: list, interval: float):
        self.storage, self.trials, self.interval = storage, trials, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="gdlab-heartbeats", daemon=True)

    def _beat(self) -> None:
        while True:
            for trial in self.trials:
                self.storage.record_heartbeat(trial._trial_id)  # Optuna's own loop uses the same id
            if self.done.wait(self.interval):
                return

    def __enter__(self):
        if self.storage.get_heartbeat_interval() is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()


class StudyLock:
    """--exclusive: one gdlab-sweep per study and storage on this machine, for scheduled jobs.

    An exclusive flock on a file in the machine's own temporary directory (never under mlruns/, which
    may be on NFS or Lustre, where flock can be cluster-wide or a no-op). The file name is a hash of the
    storage URL and the study name, so no password reaches the disk."""

    def __init__(self, storage_url: str, study_name: str, directory: Path | None = None):
        directory = directory or Path(tempfile.gettempdir()) / f"gdlab-locks-{os.getuid()}"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if storage_url.startswith("sqlite:///") and not storage_url.startswith("sqlite:////"):  # relative:
            storage_url = f"sqlite:///{os.path.abspath(storage_url[len('sqlite:///') :])}"  # this folder's
        key = hashlib.sha256(f"{storage_url}\0{study_name}".encode()).hexdigest()[:24]
        self.path = directory / f"{key}.lock"
        self.file = open(self.path, "a+")  # noqa: SIM115 (held for the process's life)

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return True

    def holder(self) -> str:
        self.file.seek(0)
        return self.file.read().strip() or "?"
