"""A trial's own MLflow run, when the trial trains several members (folds, replicates).

The trial run is a child of the sweep's parent run and its members' runs are its children, so MLflow's UI
reads sweep -> trial -> members. It carries the trial's params (its configuration, its first seed), its
value (the aggregate the sweep ranked it by) as final/<objective>, the members' spread of it
(final/<objective>_std, _ci_low, _ci_high: gdlab.replicates.summarize), the members' mean of every other
final number, and per epoch the members' mean and standard deviation of each split's loss and accuracy
(<metric> and <metric>_std, over the members that trained in that epoch). gdlab-report on the parent reads
the trial runs as it reads single trials, and draws the spread where it is there.

The runs are created together before the batch trains (gdlab.run_store, or one by one where the store has
no bulk path) and written afterwards through the metric writer (gdlab.metric_writer), in the background.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from omegaconf import DictConfig

from gdlab.data import SPLIT_METRICS
from gdlab.held_histories import forget
from gdlab.masking import error_line, mask_passwords
from gdlab.repair import process_tags
from gdlab.replicates import summarize
from gdlab.stores import mlflow_client
from gdlab.tracking import (
    CURVES_ENDING_AT_FINAL,
    PARENT_ENV,
    TrackingUnavailable,
    artifact_root,
    experiment_name,
    experiment_of_run,
    flatten,
    get_or_create_experiment,
    tracking_uri,
    trial_run_name,
)

TRIAL_KIND = "trial"  # the gdlab.kind tag of a trial's own run
DRAIN_SECONDS = 600


def start_trial_runs(cfgs: list[DictConfig], trials: list, members: int) -> list[str] | None:
    """One RUNNING run per trial, created before any member (None when tracking is off): an unreachable
    store stops the batch here, before training."""
    uri = tracking_uri(cfgs[0])
    if uri is None:
        return None
    from gdlab.run_store import NewRun, create_runs

    parent = os.environ.get(PARENT_ENV)
    new_runs = []
    for trial, cfg in zip(trials, cfgs, strict=True):
        tags = {"gdlab.kind": TRIAL_KIND, "gdlab.members": str(members), "objective": cfg.objective,
                "optuna.study": trial.study.study_name, "optuna.trial": str(trial.number),
                **process_tags()}  # fmt: skip
        if parent:
            tags["mlflow.parentRunId"] = parent
        name = trial_run_name(trial.params, trial.number, cfg)
        new_runs.append(NewRun(name, {**tags, "mlflow.runName": name}, list(flatten(cfg).items())))
    try:
        client = mlflow_client(uri)
        if parent:
            experiment_id = experiment_of_run(client, parent)
        else:
            root = artifact_root(cfgs[0], uri)
            experiment_id = get_or_create_experiment(client, experiment_name(cfgs[0]), root)
        run_ids = create_runs(client, experiment_id, new_runs)
        if run_ids is None:  # no verified bulk path: MLflow's client, run by run
            from gdlab.metric_store import log_params

            run_ids = []
            for new in new_runs:
                run_ids.append(client.create_run(experiment_id, run_name=new.name, tags=new.tags).info.run_id)
                log_params(client, run_ids[-1], new.params)
    except Exception as error:
        raise TrackingUnavailable(
            f"cannot create the trials' runs at {mask_passwords(uri)}: {error_line(error)}"
        ) from error
    return run_ids


def trial_rows(results: list, objective: str, value: float | None, now_ms: int) -> list[list]:
    """The trial run's metric rows: per epoch the members' mean and standard deviation of each split's
    loss and accuracy, and at the end the members' mean finals, the trial's value and its spread."""
    rows: list[list] = []
    if not results:
        return rows
    histories = [result.history for result in results]
    for metric in SPLIT_METRICS:
        pairs = zip(histories, results, strict=True)
        curves = [(history.set_index("epoch")[metric], r) for history, r in pairs if metric in history]
        if not curves:
            continue
        epochs = 1 + max((int(c.index.max()) for c, _ in curves if len(c)), default=-1)
        table = np.full((len(curves), epochs + 1), np.nan)
        for i, (curve, result) in enumerate(curves):
            table[i, curve.index.to_numpy(dtype=np.int64)] = curve.to_numpy(dtype=np.float64)
            if metric in CURVES_ENDING_AT_FINAL and len(curve):  # a curve ends at the trained weights
                table[i, int(curve.index.max()) + 1] = result.final.get(metric, np.nan)
        present = ~np.isnan(table)
        counts = present.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(table, axis=0) / counts
            spread = np.sqrt(np.nansum((table - mean) ** 2, axis=0) / np.maximum(counts - 1, 1))
        for epoch in np.flatnonzero((counts > 0) & np.isfinite(mean) & np.isfinite(spread)).tolist():
            rows.append([metric, float(mean[epoch]), now_ms, epoch])
            rows.append([f"{metric}_std", float(spread[epoch]), now_ms, epoch])
    for key in SPLIT_METRICS:
        values = [r.final[key] for r in results if key in r.final and key != objective]
        if values and all(math.isfinite(v) for v in values):
            rows.append([f"final/{key}", float(np.mean(values)), now_ms, 0])
    summary = summarize([r.final["objective"] for r in results])
    if value is not None and math.isfinite(value):
        rows.append([f"final/{objective}", float(value), now_ms, 0])  # the aggregate the sweep ranked
    for suffix, number in (("std", summary.std), ("ci_low", summary.low), ("ci_high", summary.high)):
        if math.isfinite(number):
            rows.append([f"final/{objective}_{suffix}", number, now_ms, 0])
    return rows


def finish_trial_run(cfg: DictConfig, run_id: str, results: list, value: float | None, state: str) -> None:
    """Hand the trial run's record and its end to the metric writer: `state` is Optuna's (COMPLETE,
    PRUNED, FAIL) or "KILLED" (its trial was taken by heartbeat)."""
    from gdlab.metric_writer import MetricWriter

    now_ms = int(time.time() * 1000)
    tags = [["optuna.state", state]] + ([["pruned", "true"]] if state == "PRUNED" else [])
    status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
    messages = [
        {"run": run_id, "metrics": trial_rows(results, cfg.objective, value, now_ms)},
        {"run": run_id, "tags": tags},
        {"run": run_id, "end": status, "end_time": now_ms},
    ]
    writer = MetricWriter.for_uri(tracking_uri(cfg))
    for message in messages:
        writer.send(message)
    HANDED[run_id] = (writer, messages)


# Each trial run's record and the writer it was handed to, until a drain has seen it written: should that
# writer die with it in hand, a new one is handed it again (its rows are written once: the store keeps one
# of each).
HANDED: dict[str, tuple] = {}


def wait_for_trial_runs(cfg: DictConfig, run_ids: list[str]) -> str | None:
    """Wait until the writer has written the trial runs (they are read by the sweep's report); where it died
    meanwhile, a new one writes them."""
    from gdlab.metric_writer import MetricWriter

    if not run_ids:
        return None
    handed = [HANDED.pop(run_id) for run_id in run_ids if run_id in HANDED]
    writers = list({id(writer): writer for writer, _ in handed}.values()) or [
        MetricWriter.for_uri(tracking_uri(cfg))
    ]
    errors = [writer.drain(run_id, DRAIN_SECONDS) for writer in writers for run_id in run_ids]  # each its own
    if any(writer.process.poll() is not None for writer in writers):  # one died: what it held, again
        writer = MetricWriter.for_uri(tracking_uri(cfg))
        for _, messages in handed:
            for message in messages:
                writer.send(message)
        errors = [writer.drain(run_id, DRAIN_SECONDS) for run_id in run_ids]
    error = next((error for error in errors if error), None)
    for run_id in run_ids if error else ():  # their curves are read back from the store
        forget(run_id)
    return error
