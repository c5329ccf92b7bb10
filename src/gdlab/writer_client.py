"""The store calls of a tracked sweep's end, made by the metric writer process (gdlab.writer_calls), so the
command never imports MLflow: `WriterClient` has the names and arguments of `MlflowClient`'s methods a
sweep's end uses, and returns `RunRecord`s (the fields of MLflow's `Run` that gdlab reads) where MLflow
returns a `Run`. Where no writer is at work on the store, or it died, each call runs here, through the same
function of gdlab.writer_calls on this process's own client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gdlab import writer_calls
from gdlab.metric_writer import MetricWriter, WriterGone


@dataclass
class RunInfo:
    run_id: str
    run_name: str
    status: str
    experiment_id: str
    start_time: int | None = None
    end_time: int | None = None
    artifact_uri: str | None = None


@dataclass
class RunData:
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # each metric's latest value
    tags: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """What gdlab reads of an MLflow `Run`: `info` and `data`, as MLflow names them."""

    info: RunInfo
    data: RunData

    @classmethod
    def of(cls, fields: dict) -> RunRecord:
        return cls(RunInfo(**fields["info"]), RunData(**fields["data"]))


class MetricPoint(NamedTuple):
    """A point of `get_metric_history`, as MLflow's `Metric` names its fields."""

    key: str
    value: float
    timestamp: int
    step: int


class Page(list):
    """A page of `search_runs`: its runs, and the token of the next page (None on the last)."""

    def __init__(self, runs: list, token: str | None):
        super().__init__(runs)
        self.token = token


class WriterClient:
    """A client whose calls the metric writer process makes (see the module's doc)."""

    reads_in_bulk = False  # gdlab.metric_store's one-query reads need a client of this process

    def __init__(self, uri: str):
        self.tracking_uri = uri
        self.writer = MetricWriter.running(uri)

    def _call(self, name: str, made: list[str] | None = None, **kwargs):
        """`made`: the names of the runs the call makes (its answer lost with the writer, they are
        `end_orphans`'s before they are made here)."""
        if self.writer is not None:
            try:
                return self.writer.call(name, **kwargs)
            except WriterGone:
                self.writer = None  # this call, and the rest, here
                if made:
                    end_orphans(self.tracking_uri, made)
        from gdlab.stores import mlflow_client

        return getattr(writer_calls, name)(mlflow_client(self.tracking_uri), **kwargs)

    def create_run(self, run_name: str, tags: dict, experiment: list | None = None,
                   parent_run_id: str | None = None) -> str:  # fmt: skip
        """A RUNNING run's id, in `experiment` ([name, artifact location]: found or made) or its parent's."""
        return self._call("create_run", made=[run_name], run_name=run_name, tags=tags, experiment=experiment,
                          parent_run_id=parent_run_id)["run_id"]  # fmt: skip

    def end_runs_of_dead_trials(self, study_name: str, states: dict[str, str]) -> int:
        """gdlab.repair.end_runs_of_dead_trials (`states`: gdlab.repair.trial_states)."""
        return self._call("end_runs_of_dead_trials", study_name=study_name, states=states)

    def get_run(self, run_id: str) -> RunRecord:
        return RunRecord.of(self._call("get_run", run_id=run_id))

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", order_by: list | None = None,
                    page_token: str | None = None, max_results: int = 1000) -> Page:  # fmt: skip
        page = self._call("search_runs", experiment_ids=list(experiment_ids), filter_string=filter_string,
                          order_by=order_by, page_token=page_token, max_results=max_results)  # fmt: skip
        return Page([RunRecord.of(run) for run in page["runs"]], page["token"])

    def get_metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        return [MetricPoint(*point) for point in self._call("get_metric_history", run_id=run_id, key=key)]

    def log_plain_batch(self, run_id: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
        self._call("log_plain_batch", run_id=run_id, metrics=list(metrics), params=list(params),
                   tags=list(tags))  # fmt: skip

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", run_id=run_id, local_dir=str(Path(local_dir).resolve()),
                   artifact_path=artifact_path)  # fmt: skip

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        return self._call(
            "download_artifacts", run_id=run_id, path=path, dst_path=str(Path(dst_path).resolve())
        )

    def set_tag(self, run_id: str, key: str, value) -> None:
        self._call("set_tag", run_id=run_id, key=key, value=str(value))

    def set_experiment_tag(self, experiment_id: str, key: str, value) -> None:
        self._call("set_experiment_tag", experiment_id=experiment_id, key=key, value=str(value))

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._call("set_terminated", run_id=run_id, status=status, end_time=end_time)


def log_plain_batch(client, run_id: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
    """(key, value, timestamp, step) metrics, (key, value) params and tags on a run, through either client."""
    if isinstance(client, WriterClient):
        client.log_plain_batch(run_id, metrics, params, tags)
    else:
        writer_calls.log_plain_batch(client, run_id, metrics, params, tags)


def end_orphans(uri: str, names: list[str]) -> int:
    """After the writer died with a call that makes runs unanswered: the runs it may have made (RUNNING,
    made for this process, named as asked) ended FAILED with the reason and deleted (MLflow's soft delete:
    they never trained and nobody holds them), so the runs made again here are the sweep's only ones. How
    many. Runs this process holds (its sweep's parent) have other names."""
    from gdlab.repair import HOST_TAG, PID_TAG, PROCESS_TAG, process_tags
    from gdlab.stores import mlflow_client

    client, mine = mlflow_client(uri), process_tags()
    key = PROCESS_TAG if PROCESS_TAG in mine else PID_TAG
    host = mine[HOST_TAG].replace("'", "")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    mine_running = (f"attributes.status = 'RUNNING' and tags.`{key}` = '{mine[key]}' "
                    f"and tags.`{HOST_TAG}` = '{host}'")  # fmt: skip
    running = client.search_runs(experiments, mine_running, max_results=5000)
    orphans = [run for run in running if run.info.run_name in set(names)]
    for run in orphans:
        client.set_tag(run.info.run_id, "failure.reason", "made by the metric writer, which died before it "
                       "said so: made again by the training process")  # fmt: skip
        client.set_terminated(run.info.run_id, status="FAILED")
        client.delete_run(run.info.run_id)
    return len(orphans)
