"""What the metric writer process does for the training process on request (`MetricWriter.call`): the
store work a tracked sweep needs before its first epoch (its experiment, its parent run, its trials' runs),
done where MLflow is imported already.

Importing MLflow costs ~0.7 s of CPU that the training process would pay on its own critical path, beside
Lightning's import; the writer process imports it on the other core from the command's first second. Each
call takes the writer's client first and JSON-able arguments, and returns JSON. An error is the caller's to
judge (gdlab.metric_writer.RemoteError); where the writer is gone, the caller does the same work itself
with the same functions (gdlab.experiments, gdlab.run_store, gdlab.repair).
"""

from __future__ import annotations

from gdlab.experiments import experiment_of_run, get_or_create_experiment
from gdlab.masking import error_line


def experiment_id(client, experiment: list | None, parent_run_id: str | None) -> str:
    """The parent's experiment, else `experiment` ([name, artifact location]) found or created."""
    if parent_run_id:
        return experiment_of_run(client, parent_run_id)
    name, artifact_location = experiment
    return get_or_create_experiment(client, name, artifact_location)


def create_run(client, run_name: str, tags: dict, experiment: list | None = None,
               parent_run_id: str | None = None) -> dict:  # fmt: skip
    """One RUNNING run, as `MlflowClient.create_run` makes it: {"run_id", "experiment_id"}."""
    made_in = experiment_id(client, experiment, parent_run_id)
    run_id = client.create_run(made_in, run_name=run_name, tags=tags).info.run_id
    return {"run_id": run_id, "experiment_id": made_in}


def create_runs(client, runs: list[list], experiment: list | None = None,
                parent_run_id: str | None = None) -> dict:  # fmt: skip
    """A population's runs ([name, tags, params] each): the first alone (an error here is the store out of
    reach: raised), the rest in one transaction where the store allows (gdlab.run_store), else one by one.
    {"experiment_id", "run_ids": those made, in order, "error": why the rest were not made, or None}."""
    from gdlab.metric_store import log_params
    from gdlab.run_store import NewRun
    from gdlab.run_store import create_runs as create_in_bulk

    new_runs = [NewRun(name, tags, [tuple(param) for param in params]) for name, tags, params in runs]
    first = create_run(client, new_runs[0].name, new_runs[0].tags, experiment, parent_run_id)
    made_in, run_ids = first["experiment_id"], [first["run_id"]]
    try:
        log_params(client, run_ids[0], new_runs[0].params)
        rest = create_in_bulk(client, made_in, new_runs[1:]) if len(new_runs) > 1 else []
        if rest is None:  # no verified bulk path: MLflow's client, run by run
            rest = []
            for new in new_runs[1:]:
                run_ids.append(client.create_run(made_in, run_name=new.name, tags=new.tags).info.run_id)
                log_params(client, run_ids[-1], new.params)
        run_ids += rest
    except Exception as error:
        return {"experiment_id": made_in, "run_ids": run_ids, "error": error_line(error)}
    return {"experiment_id": made_in, "run_ids": run_ids, "error": None}


def end_runs_of_dead_trials(client, study_name: str, states: dict[str, str]) -> int:
    """gdlab.repair.end_runs_of_dead_trials, for a study whose trials are in `states`
    (gdlab.repair.trial_states)."""
    from gdlab.repair import end_runs_of_finished_trials

    return end_runs_of_finished_trials(client, study_name, {int(n): state for n, state in states.items()})


# --- the store calls of a sweep's end (gdlab.writer_client.WriterClient) --------------------------------


def run_record(run) -> dict:
    """An MLflow Run as gdlab.writer_client.RunRecord's fields."""
    info, data = run.info, run.data
    fields = ("run_id", "run_name", "status", "experiment_id", "start_time", "end_time", "artifact_uri")
    return {
        "info": {name: getattr(info, name) for name in fields},
        "data": {"params": dict(data.params), "metrics": dict(data.metrics), "tags": dict(data.tags)},
    }


def get_run(client, run_id: str) -> dict:
    return run_record(client.get_run(run_id))


def search_runs(client, experiment_ids: list[str], filter_string: str = "", order_by: list | None = None,
                page_token: str | None = None, max_results: int = 1000) -> dict:  # fmt: skip
    page = client.search_runs(experiment_ids, filter_string, order_by=order_by, page_token=page_token,
                              max_results=max_results)  # fmt: skip
    return {"runs": [run_record(run) for run in page], "token": page.token}


def get_metric_history(client, run_id: str, key: str) -> list[list]:
    return [[m.key, m.value, m.timestamp, m.step] for m in client.get_metric_history(run_id, key)]


def log_plain_batch(client, run_id: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
    """`client.log_batch` of (key, value, timestamp, step) metrics, (key, value) params and tags."""
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(run_id, [Metric(*m) for m in metrics], [Param(*p) for p in params],
                     [RunTag(*t) for t in tags])  # fmt: skip


def log_artifacts(client, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    client.log_artifacts(run_id, local_dir, artifact_path)


def download_artifacts(client, run_id: str, path: str, dst_path: str) -> str:
    return client.download_artifacts(run_id, path, dst_path)


def set_tag(client, run_id: str, key: str, value: str) -> None:
    client.set_tag(run_id, key, value)


def set_experiment_tag(client, experiment_id: str, key: str, value: str) -> None:
    client.set_experiment_tag(experiment_id, key, value)


def set_terminated(client, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
    client.set_terminated(run_id, status=status, end_time=end_time)
