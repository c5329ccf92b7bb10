"""Many MLflow runs created, and later ended, in one transaction each: a population's runs.

`MlflowClient.create_run` costs ~19 ms a run on MLflow's SQL store (a session, an experiment read and a
commit each), so a batch of 1024 members would wait ~20 s before training. MLflow has no batch create, so
`create_runs` adds the runs through the store's own session and tables (`SqlRun`, `SqlTag`), exactly as
`SqlAlchemyStore.create_run` builds each (its id, name, artifact URI, status, user and tags), with the params
`log_batch` would add (`SqlParam`, checked by MLflow's `_validate_param`), and commits once. `end_runs` ends
many runs as `set_terminated` ends each (`SqlAlchemyStore.update_run_info`), in one transaction;
`artifact_uris` reads many runs' artifact locations in one query. Like the bulk metric path
(gdlab.metric_store) they run only on a verified schema revision of a SQL store; anywhere else (a tracking
server, another revision) the caller goes run by run through MLflow's client.
tests/test_run_store.py creates and ends runs both ways and compares them through MLflow's client.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

from gdlab.interrupts import deferred
from gdlab.metric_store import verified_sql_store

RUN_NAME_TAG, USER_TAG = "mlflow.runName", "mlflow.user"
CHUNK = 500  # run ids in one IN (...) clause


class NewRun(NamedTuple):
    """A run to create: its name, its tags and the params it starts with ((key, value) strings)."""

    name: str
    tags: dict[str, str]
    params: list[tuple[str, str]] = []


def checked_params(params: list[tuple[str, str]]) -> list:
    """`params` as `log_batch` takes them: MLflow's own checks (names, lengths, values truncated as it
    truncates them, unique keys)."""
    from mlflow.utils.validation import _validate_param, _validate_param_keys_unique

    checked = [_validate_param(key, value) for key, value in params]
    _validate_param_keys_unique(checked)
    return checked


def create_runs(client, experiment_id: str, runs: list[NewRun]) -> list[str] | None:
    """The ids of `runs` created RUNNING in `experiment_id` in one transaction, as
    `client.create_run(experiment_id, run_name=name, tags=tags)` then `client.log_batch(id, params=params)`
    make each; None where this store has no verified bulk path (nothing is created then)."""
    store = verified_sql_store(client)
    if store is None:
        return None
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from mlflow.utils.time import get_current_time_millis
    from mlflow.utils.uri import append_to_uri_path
    from sqlalchemy import insert

    experiment = store.get_experiment(experiment_id)
    store._check_experiment_is_active(experiment)
    ARTIFACTS = store.ARTIFACTS_FOLDER_NAME  # noqa: N806
    start_time, run_rows, tag_rows, param_rows = get_current_time_millis(), [], [], []
    for name, tags, params in runs:
        if tags.get(RUN_NAME_TAG, name) != name:
            raise ValueError(f"run name {name!r} differs from its {RUN_NAME_TAG} tag {tags[RUN_NAME_TAG]!r}")
        run_id = uuid.uuid4().hex
        run_rows.append(dict(
            name=name,
            artifact_uri=append_to_uri_path(experiment.artifact_location, run_id, ARTIFACTS),
            run_uuid=run_id,
            experiment_id=experiment_id,
            source_type=SourceType.to_string(SourceType.UNKNOWN),
            source_name="",
            entry_point_name="",
            user_id=tags.get(USER_TAG, "unknown"),
            status=RunStatus.to_string(RunStatus.RUNNING),
            start_time=start_time,
            end_time=None,
            deleted_time=None,
            source_version="",
            lifecycle_stage=LifecycleStage.ACTIVE,
        ))  # fmt: skip
        tag_rows += [
            dict(key=key, value=value, run_uuid=run_id) for key, value in {**tags, RUN_NAME_TAG: name}.items()
        ]
        param_rows += [dict(key=p.key, value=p.value, run_uuid=run_id) for p in checked_params(params)]
    # the tables' rows in three statements (the ORM's unit of work would cost ~4 ms a run)
    with store.ManagedSessionMaker(read_only=False) as session:
        for model, rows in ((SqlRun, run_rows), (SqlTag, tag_rows), (SqlParam, param_rows)):
            if rows:
                session.execute(insert(model.__table__), rows)
    run_ids = [row["run_uuid"] for row in run_rows]
    return run_ids


def end_runs(client, ends: list[tuple[str, str, int]]) -> bool:
    """End each (run id, status, end time in ms) in one transaction, as `client.set_terminated(run_id, status,
    end_time)` ends each (an unknown or deleted run raises MLflow's own error, and nothing is ended); False
    where this store has no verified bulk path (nothing is ended then)."""
    store = verified_sql_store(client)
    if store is None:
        return False
    from mlflow.entities import RunStatus
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
    from mlflow.store.tracking.dbmodels.models import SqlRun

    with store.ManagedSessionMaker(read_only=False) as session:
        ids = [run_id for run_id, _, _ in ends]
        runs = {}
        for start in range(0, len(ids), CHUNK):
            chunk = session.query(SqlRun).filter(SqlRun.run_uuid.in_(ids[start : start + CHUNK]))
            runs.update((run.run_uuid, run) for run in chunk)
        for run_id, status, end_time in ends:
            run = runs.get(run_id)
            if run is None:
                raise MlflowException(f"Run with id={run_id} not found", RESOURCE_DOES_NOT_EXIST)
            store._check_run_is_active(run)
            run.status = RunStatus.to_string(RunStatus.from_string(status))
            run.end_time = end_time
    return True


def artifact_uris(client, run_ids: list[str]) -> dict[str, str] | None:
    """Each run's artifact URI (`get_run(id).info.artifact_uri`), CHUNK runs a query; None where this store
    has no verified bulk path."""
    store = verified_sql_store(client)
    if store is None:
        return None
    from mlflow.store.tracking.dbmodels.models import SqlRun
    from sqlalchemy import select

    table, uris = SqlRun.__table__, {}
    with deferred(), store.engine.connect() as connection:  # gdlab.stores.whole_sessions
        for start in range(0, len(run_ids), CHUNK):
            chunk = run_ids[start : start + CHUNK]
            uris.update(connection.execute(select(table.c.run_uuid, table.c.artifact_uri)
                                           .where(table.c.run_uuid.in_(chunk))).all())  # fmt: skip
    return uris
