"""Many MLflow runs created in one transaction: a population's runs, before its batch trains.

`MlflowClient.create_run` costs ~19 ms a run on MLflow's SQL store (a session, an experiment read and a
commit each), so a batch of 1024 members would wait ~20 s before training. MLflow has no batch create, so
`create_runs` adds the runs through the store's own session and ORM models (`SqlRun`, `SqlTag`), exactly as
`SqlAlchemyStore.create_run` builds each (its id, name, artifact URI, status, user and tags), and commits
once. Like the bulk metric path (gdlab.metric_store) it runs only on a verified schema revision of a SQL
store; anywhere else (a tracking server, another revision) the caller creates runs one by one.
tests/test_run_store.py creates runs both ways and compares them through MLflow's client.
"""

from __future__ import annotations

import uuid

from gdlab.metric_store import verified_sql_store

RUN_NAME_TAG, USER_TAG = "mlflow.runName", "mlflow.user"


def create_runs(client, experiment_id: str, runs: list[tuple[str, dict[str, str]]]) -> list[str] | None:
    """The ids of `runs` ((name, tags) each) created RUNNING in `experiment_id` in one transaction, as
    `client.create_run(experiment_id, run_name=name, tags=tags)` creates each; None where this store has
    no verified bulk path (nothing is created then)."""
    store = verified_sql_store(client)
    if store is None:
        return None
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from mlflow.utils.time import get_current_time_millis
    from mlflow.utils.uri import append_to_uri_path

    experiment = store.get_experiment(experiment_id)
    store._check_experiment_is_active(experiment)
    start_time, run_ids = get_current_time_millis(), []
    with store.ManagedSessionMaker(read_only=False) as session:
        for name, tags in runs:
            if tags.get(RUN_NAME_TAG, name) != name:
                raise ValueError(
                    f"run name {name!r} differs from its {RUN_NAME_TAG} tag {tags[RUN_NAME_TAG]!r}"
                )
            run_id = uuid.uuid4().hex
            run = SqlRun(
                name=name,
                artifact_uri=append_to_uri_path(
                    experiment.artifact_location, run_id, store.ARTIFACTS_FOLDER_NAME
                ),
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
            )
            run.tags = [SqlTag(key=key, value=value) for key, value in {**tags, RUN_NAME_TAG: name}.items()]
            session.add(run)
            run_ids.append(run_id)
    return run_ids
