"""A new SQLite MLflow store, made whole before it appears and in a fraction of a second.

MLflow makes a new SQLite store by running its ~50 schema migrations: 2-3 s of CPU, plus 2.5 s of importing
MLflow, in every new folder a user trains in. Their result is the same file every time for one MLflow
version, except for the Default experiment, which MLflow's store adds on opening a store without one (its
artifact location depends on where it is opened). So the first store is made by MLflow itself, kept without
its Default experiment as a template in the user's cache, and copied for every later one; the first
`MlflowClient` to open the copy adds the Default experiment as it would. tests/test_new_store.py proves a
copy equal to a store MLflow makes, through MLflow's client and the schema.

A store (copied or made) is written beside its path and renamed onto it: whoever opens the path meanwhile
(the MLflow UI, a script, another gdlab process) finds no store or a whole one. Callers hold the store's lock
(gdlab.stores.store_lock).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from importlib.metadata import version
from pathlib import Path

CACHE_ENV = "GDLAB_CACHE_DIR"


def template_path() -> Path:
    """Where the template for the installed MLflow and SQLAlchemy lives ($GDLAB_CACHE_DIR, else
    $XDG_CACHE_HOME/gdlab, else ~/.cache/gdlab)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = os.environ.get(CACHE_ENV) or user_cache / "gdlab"
    return Path(cache) / f"mlflow-{version('mlflow')}-sqlalchemy-{version('sqlalchemy')}.db"


def make_sqlite_store(database: Path) -> None:
    """Put a new, empty MLflow store at `database` (its folder exists)."""
    staging = database.with_name(f".{database.name}.{os.getpid()}.new")
    try:
        template = usable_template()
        if template is not None:
            shutil.copyfile(template, staging)
        else:  # no cache to keep a template in: MLflow makes this one
            migrate(staging)
        os.replace(staging, database)
    finally:
        staging.unlink(missing_ok=True)


def usable_template() -> Path | None:
    """The template, made now if there is none; None where the cache cannot be written."""
    template = template_path()
    if revisions(template) == 1:
        return template
    staging = template.with_name(f".{template.name}.{os.getpid()}.new")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        migrate(staging)
        with sqlite3.connect(staging) as db:  # MLflow adds it, with its own artifact location, on opening
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        db.close()
        os.replace(staging, template)  # two processes making it together: either one's is whole
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
    return template


def revisions(database: Path) -> int:
    """How many schema revisions the file says it is at (1 for a whole store; 0 if it is not one)."""
    if not database.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return len(db.execute("SELECT version_num FROM alembic_version").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def migrate(database: Path) -> None:
    """MLflow's own way: its store on a new file runs every migration (and adds the Default experiment)."""
    from mlflow import MlflowClient

    database.unlink(missing_ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    client.search_experiments(max_results=1)
    engine = getattr(getattr(client._tracking_client, "store", None), "engine", None)
    if engine is not None:
        engine.dispose()  # every connection closed before the file moves
