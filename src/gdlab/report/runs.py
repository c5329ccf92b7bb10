"""The runs a report compares, read from MLflow: an experiment's, or a parent run's children, with their
curves (`TrackedRun`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gdlab.data import SPLIT_METRICS
from gdlab.masking import error_line, mask_passwords

CURVE_METRICS = (*SPLIT_METRICS, "evals/total")


class ReportError(Exception):
    """A report that cannot be made (unknown target, no runs, unreachable store): one line for the user."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@dataclass
class TrackedRun:
    """What the report needs of one MLflow run: its params, and its curves indexed by epoch."""

    run_id: str
    name: str
    params: dict[str, str]
    curves: pd.DataFrame  # index: epoch (the MLflow step); columns: the metrics in CURVE_METRICS it has
    status: str = "FINISHED"  # MLflow's: FINISHED, FAILED, KILLED, RUNNING
    diverged_at: str | None = None  # gdlab's failure.epoch tag: the loss became NaN/inf there
    label: str = ""
    latest: dict = field(default_factory=dict)  # every metric's latest value (final/<metric> included)
    tags: dict = field(default_factory=dict)  # its MLflow tags (optuna.state=PRUNED marks a pruned trial)
    pbt: dict | None = None  # a PBT member's pbt.json (gdlab.pbt.PopulationBasedTraining.member_record)

    @property
    def outcome(self) -> str:
        return f"diverged at epoch {self.diverged_at}" if self.diverged_at is not None else self.status

    @property
    def epochs(self) -> int:
        """Epochs trained: final/epochs where logged (a curve's last point, step = epochs, is the trained
        weights' value), else the last step + 1 (runs of gdlab before that point was logged)."""
        if "final/epochs" in self.latest:
            return int(self.latest["final/epochs"])
        return int(self.curves.index.max()) + 1 if len(self.curves) else 0

    @property
    def evals_per_epoch(self) -> set[float]:
        """The numbers of function evaluations its epochs spent ({1.0} for fixed-step GD); empty without
        evals/total, which counts them up to each epoch's end."""
        if "evals/total" not in self.curves:
            return set()
        total = self.curves["evals/total"].dropna()
        return set(total.diff().fillna(total.iloc[0] if len(total) else 0.0).tolist())

    def last(self, metric: str) -> float:
        if metric not in self.curves:
            return float(self.latest.get(metric, math.nan))
        values = self.curves[metric].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan


# --- where the runs are --------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else gdlab's local store: ./mlruns/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


def make_client(uri: str):
    from gdlab.stores import mlflow_client  # also ends runs that dead processes left RUNNING

    # Opening a SQLite URI creates the database: a mistyped path must not leave an empty store behind.
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ReportError(f"no MLflow store at {uri} (the file {database} does not exist)")
    try:
        return mlflow_client(uri)
    except Exception as error:  # not an MLflow store, a corrupt file, an unreachable server
        what = f"cannot open the MLflow store at {mask_passwords(uri)}"
        raise ReportError(f"{what}: {error_line(error)}") from error


def find_runs(client, target: str) -> tuple[list, str | None]:
    """The runs TARGET names, and the parent run id when TARGET is one (None for an experiment)."""
    experiment = client.get_experiment_by_name(target)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return search_all_runs(client, experiment.experiment_id), None
    parent = find_run(client, target)
    if parent is None:
        raise ReportError(f"'{target}' is neither an experiment name nor a run id in {client.tracking_uri}")
    children = search_all_runs(client, parent.info.experiment_id, f"tags.mlflow.parentRunId = '{target}'")
    return children, target


def find_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    runs, page_token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time ASC"],
                                  page_token=page_token)  # fmt: skip
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


SPREADS = tuple(f"{metric}_std" for metric in SPLIT_METRICS)  # a trial's members' (gdlab.sweep.trial_runs)


def curve_metrics(run) -> list[str]:
    """The metrics of a run the report draws as curves: the CURVE_METRICS it has, and its hp/ numbers."""
    hyperparameters = sorted(m for m in run.data.metrics if m.startswith("hp/"))  # scheduled or PBT's
    return [metric for metric in (*CURVE_METRICS, *SPREADS, *hyperparameters) if metric in run.data.metrics]


def is_curve_metric(key: str) -> bool:
    """Whether the report draws a metric as a curve (`curve_metrics`)."""
    return key in CURVE_METRICS or key in SPREADS or key.startswith("hp/")


def load_run(client, run, histories: dict | None = None) -> TrackedRun:
    """A run and its curves: from `histories` (read_histories) where given, else from get_metric_history."""
    curves = {}
    for metric in curve_metrics(run):
        if histories is not None:
            history = histories.get((run.info.run_id, metric), [])
        else:
            history = [
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, metric)
            ]
        if isinstance(history, pd.Series):  # a curve held by this process (gdlab.held_histories)
            curves[metric] = history
            continue
        # A step logged twice (a retried batch) keeps its latest value.
        ordered = sorted(history, key=lambda point: point[:2])  # by (step, timestamp)
        curves[metric] = pd.Series({step: value for step, _, value in ordered}, dtype=float)
    frame = pd.DataFrame(curves).sort_index()
    frame.index.name = "epoch"
    name = run.data.tags.get("mlflow.runName") or run.info.run_name or run.info.run_id
    return TrackedRun(run.info.run_id, name, dict(run.data.params), frame, run.info.status,
                      run.data.tags.get("failure.epoch"), latest=dict(run.data.metrics),
                      tags=dict(run.data.tags))  # fmt: skip


def read_histories(client, runs: list) -> tuple[dict, set[str]]:
    """({(run id, metric): its curve}, the runs it covers): the curves this process handed MLflow itself
    (gdlab.held_histories: a sweep's own trials), the other runs' in one query of MLflow's SQL store where
    gdlab's bulk paths are verified (gdlab.metric_store). A run it does not cover is read curve by curve."""
    from gdlab.held_histories import held_curves, held_runs
    from gdlab.metric_store import read_metric_histories

    keys = sorted({metric for run in runs for metric in curve_metrics(run)})
    run_ids = [run.info.run_id for run in runs]
    held = held_runs(run_ids)
    histories: dict = held_curves(sorted(held), keys)
    rest = [run_id for run_id in run_ids if run_id not in held]
    bulk = rest and getattr(client, "reads_in_bulk", True)  # gdlab.writer_client's: curve by curve
    stored = read_metric_histories(client, rest, keys) if bulk else ({} if not rest else None)
    if stored is None:
        return histories, held
    return {**histories, **stored}, set(run_ids)


def load_runs(client, target: str, children: list | None = None) -> tuple[list[TrackedRun], str | None]:
    runs, parent_id = (children, target) if children is not None else find_runs(client, target)
    # Only training runs log train/loss: a sweep's parent run, in the same experiment, is left out.
    runs = [run for run in runs if "train/loss" in run.data.metrics]
    histories, covered = read_histories(client, runs)
    runs = [load_run(client, run, histories if run.info.run_id in covered else None) for run in runs]
    if not runs:
        what = f"run {parent_id} has no child runs" if parent_id else f"experiment '{target}' has no runs"
        raise ReportError(f"{what} with a train/loss metric")
    return runs, parent_id


def read_runs(
    client, uri: str, target: str, children: list | None = None
) -> tuple[list[TrackedRun], str | None]:
    try:
        return load_runs(client, target, children)
    except ReportError:
        raise
    except Exception as error:  # an unreachable server, a store of another MLflow version, ...
        first_line = error_line(error)
        raise ReportError(f"cannot read the MLflow store at {uri}: {first_line}") from error
