"""gdlab.new_store: a new SQLite store copied from a template is the store MLflow would have made, seen
through MLflow's own client and the schema; the template is made once, by MLflow."""

import contextlib
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from gdlab import new_store


def schema(database: Path) -> list:
    """[every table, index and trigger with its SQL, every table's rows]. A statement's lines are compared as
    a set: MLflow's own migrations order a table's CHECK constraints differently from one store to the next
    (two stores MLflow makes differ so)."""
    query = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
    with contextlib.closing(sqlite3.connect(database)) as db:
        found = list(db.execute(query))
        statements = sorted((kind, name, sorted(line.strip(" \t,") for line in (sql or "").splitlines()))
                            for kind, name, sql in found)  # fmt: skip
        rows = {
            name: sorted(db.execute(f'SELECT * FROM "{name}"')) for kind, name, _ in found if kind == "table"
        }
    return [statements, rows]


def same_but_ids_and_times(value):
    if isinstance(value, int) and value > 10**12:  # a time in milliseconds
        return "<time>"
    return re.sub(r"[0-9a-f]{32}", "<id>", value) if isinstance(value, str) else value


def what_mlflow_shows(database: Path) -> dict:
    """A store's content through MLflow's client, after the same writes to each."""
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    (default,) = client.search_experiments()
    experiment = client.create_experiment("gdlab")
    run = client.create_run(experiment, run_name="r")
    client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.5, 1, 0)], params=[Param("lr", "0.1")],
                     tags=[RunTag("t", "v")])  # fmt: skip
    got = client.get_run(run.info.run_id)
    return {
        "default": (
            default.experiment_id,
            default.name,
            default.artifact_location,
            default.lifecycle_stage,
            default.tags,
        ),  # fmt: skip
        "experiment": experiment,
        "run": (
            got.info.experiment_id,
            got.info.run_name,
            got.data.metrics,
            got.data.params,
            {k: v for k, v in got.data.tags.items() if not k.startswith("mlflow.")},
        ),  # fmt: skip
        "history": [(m.value, m.step) for m in client.get_metric_history(run.info.run_id, "loss")],
    }


def test_a_store_copied_from_the_template_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # both stores' Default experiment puts its artifacts under ./mlruns
    monkeypatch.setenv(new_store.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "by-mlflow").mkdir()
    (tmp_path / "by-gdlab").mkdir()
    by_mlflow, by_gdlab = tmp_path / "by-mlflow" / "mlflow.db", tmp_path / "by-gdlab" / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{by_mlflow}").search_experiments()  # MLflow's migrations
    new_store.make_sqlite_store(by_gdlab)
    template = new_store.template_path()
    assert template.parent == tmp_path / "cache" and new_store.revisions(template) == 1
    assert what_mlflow_shows(by_gdlab) == what_mlflow_shows(by_mlflow)
    made_by_mlflow, made_by_gdlab = schema(by_mlflow), schema(by_gdlab)
    assert made_by_gdlab[0] == made_by_mlflow[0]  # every table, index and trigger, with its SQL
    for rows in (made_by_mlflow[1], made_by_gdlab[1]):  # run ids and times differ; nothing else
        for table, found in rows.items():
            rows[table] = [tuple(same_but_ids_and_times(value) for value in row) for row in found]
    assert made_by_gdlab[1] == made_by_mlflow[1]


def test_the_template_is_made_once_and_later_stores_need_no_mlflow(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; from gdlab import stores; stores.make_new_store(sys.argv[1]); "
            "print('mlflow' in sys.modules)")  # fmt: skip
    env = {"GDLAB_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"],
                           capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    (template,) = cache.iterdir()
    made = template.stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"],
                            capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert (first.stdout, second.stdout) == ("True\n", "False\n")  # MLflow made the template, then no more
    assert template.stat().st_mtime_ns == made
    assert [
        e.name for e in MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}").search_experiments()
    ] == ["Default"]


def test_without_a_writable_cache_mlflow_makes_each_store(tmp_path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(new_store.CACHE_ENV, str(tmp_path / "not-a-folder" / "cache"))
    new_store.make_sqlite_store(tmp_path / "mlflow.db")
    assert new_store.revisions(tmp_path / "mlflow.db") == 1
    assert {p.name for p in tmp_path.iterdir()} == {"not-a-folder", "mlflow.db"}  # nothing left beside it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.experiment_id for e in client.search_experiments()] == ["0"]
