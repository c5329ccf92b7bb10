"""The record of a fit, after training: each member's RunResult (its history, and final metrics measured
once more at its trained weights), its output files, then its MLflow run, written in that order so that a
full disk or a tracking outage never costs the history."""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gdlab.artifacts import write_history, write_run_outputs
from gdlab.data import Dataset
from gdlab.epoch_table import EpochTable
from gdlab.held_histories import forget
from gdlab.masking import error_line, mask_passwords, masked_config_yaml
from gdlab.member_runs import create_member_runs
from gdlab.metric_writer import MetricWriter
from gdlab.model import MLP
from gdlab.module import PopulationOutcome
from gdlab.pbt import PopulationBasedTraining
from gdlab.population import Population
from gdlab.tracking import PARENT_ENV, MlflowRun, run_name, tracking_uri

log = logging.getLogger("gdlab")


class RunResult:
    """One run's (or population member's) result.

    history: one row per epoch, one column per logged value; final: final metrics (at the trained
    weights), evaluation counts, wall time, objective; model: the trained network; config: its config;
    ended_at: wall-clock time its training ended (a population member's own end). A population member's
    `history`, `model` and `config` are made when first read: thousands of members cost nothing until then.
    """

    def __init__(
        self, history: pd.DataFrame, final: dict, model, config, data: Dataset, ended_at: float = 0.0
    ):
        self.final, self.data, self.ended_at = final, data, ended_at
        self._history, self._model, self._config = history, model, config

    @property
    def history(self) -> pd.DataFrame:
        if isinstance(self._history, Later):
            self._history = self._history()
        return self._history

    @property
    def model(self) -> MLP:
        if isinstance(self._model, Later):
            self._model = self._model()
        return self._model

    @property
    def config(self) -> DictConfig:
        if isinstance(self._config, Later):
            self._config = self._config()
        return self._config

    def __repr__(self) -> str:
        return f"RunResult(final={self.final!r})"


class Later(functools.partial):
    """A value made on first use (see RunResult)."""


def record_pbt(pbt: PopulationBasedTraining, table: EpochTable, results: list[RunResult],
               overrides: list[list[str]], directories: list, runs: list) -> None:  # fmt: skip
    """Each member's PBT record: pbt.json in its output directory (an artifact of its run), its replay
    and exploit count in its final numbers and as tags."""
    run_ids = [run.run_id if run is not None else None for run in runs]
    histories = [result.history.to_dict("records") for result in results]
    for p, result in enumerate(results):
        member = pbt.member_record(p, histories, overrides[p], run_ids)
        result.final.update(pbt_exploits=len(member["exploits"]), pbt_replay=" ".join(member["replay"]))
        if directories[p] is not None:
            directories[p].mkdir(parents=True, exist_ok=True)
            (directories[p] / "pbt.json").write_text(json.dumps(member, indent=1))
        if runs[p] is not None:
            runs[p].set_tags({"pbt.exploits": len(member["exploits"]), "pbt.donations": member["donations"],
                              "pbt.member": p, "pbt.replay": result.final["pbt_replay"][:5000]})  # fmt: skip


def start_runs(population: Population, tags, device: str) -> list[MlflowRun | None]:
    uri = tracking_uri(population.shared)
    if uri is None:
        return [None] * len(population)
    if len(population) == 1 and not recorded_by_writer(population.shared, uri):
        return [MlflowRun(population.view(0), population.overrides[0], device=device, extra_tags=tags[0])]
    # a population's runs are created together and recorded by the writer: training never waits
    views = [population.view(p) for p in range(len(population))]
    return create_member_runs(views, population.overrides, device, tags)


def recorded_by_writer(cfg: DictConfig, uri: str) -> bool:
    """Whether a single run is made and recorded by the metric writer process, as a member's is: a sweep's
    refit, where the writer is at work on the store (the sweep's command then never imports MLflow). A run
    with system metrics samples them here: MLflow's monitor is a thread of this process."""
    return (
        bool(os.environ.get(PARENT_ENV))
        and not cfg.tracking.get("system_metrics")
        and (MetricWriter.running(uri) is not None)
    )


def log_inputs(runs: list[MlflowRun | None], population: Population, data: Dataset) -> None:
    """Each tracked member's splits as MLflow datasets (gdlab.run_inputs), made once per set of rows."""
    if all(run is None for run in runs):
        return
    from gdlab.run_inputs import RunInputs

    inputs = RunInputs(population.shared.dataset, data, population.folds())
    for member, run in enumerate(runs):
        if run is not None:
            run.log_inputs(inputs, member)


def wants_model(cfg: DictConfig) -> bool:
    """Whether a run logs its network as an MLflow model: tracking.log_model, or a name to register."""
    tracking = cfg.tracking
    return bool(tracking.get("log_model")) or tracking.get("registered_model") is not None


def log_trained_model(run: MlflowRun, result: RunResult) -> None:
    """The run's trained network as an MLflow model (gdlab.logged_model), before the run ends; registered
    as a new version of tracking.registered_model where it names one. Its metrics are the run's at the
    trained weights: logged, and written by the writer, first. A failure is the run's outage."""
    from gdlab.logged_model import log_model
    from gdlab.model_logger import ModelLogger

    run.write_final(result.final)  # an outage is the run's; the model is still logged, as the store allows
    try:
        name = result.config.tracking.get("registered_model")
        arguments = (result.model, result.data.train.X.numpy(), result.final["epochs"], name)
        logger = ModelLogger.running() if run.background else None
        if logger is not None:  # a sweep's refit, whose command never imports MLflow (gdlab.model_logger)
            uri, version = logger.log(run.uri, run.run_id, *arguments)
        else:
            uri, version = log_model(run.uri, run.run_id, *arguments)
        result.final["model_uri"] = uri
        if version is not None:
            result.final["registered_model"] = f"{name} version {version}"
    except Exception as error:
        run.outage = run.outage or f"its model could not be logged: {error_line(error)}"


def status(result: RunResult) -> str:
    """How a member that trained to its end closes: diverged FAILED, else FINISHED. A pruned member is
    FINISHED too (it did what its pruner asked; its tag optuna.state=PRUNED and its name say so): KILLED
    is for runs a signal or a dead process stopped."""
    return "FAILED" if result.final["diverged_at"] is not None and not result.final["pruned"] else "FINISHED"


def record(
    population: Population, outcome: PopulationOutcome, data: Dataset, wall_time: float
) -> list[RunResult]:
    """Each member's RunResult: its history, and final metrics measured once more at its trained weights
    (all members in one batched evaluation)."""
    measured = final_metrics(outcome.model, data)
    table = outcome.table
    table.freeze()
    member_epochs = table.epochs().tolist()
    objective = population.shared.objective
    now, results = time.time(), []
    for p, epochs in enumerate(member_epochs):
        final = {key: values[p] for key, values in measured.items()}
        diverged_at = int(outcome.diverged_at[p]) if outcome.diverged_at[p] >= 0 else None
        final.update(
            epochs=epochs,
            evals_fwd=int(outcome.evals_fwd[p]),
            evals_fwdbwd=int(outcome.evals_fwdbwd[p]),
            evals=int(outcome.evals_fwd[p] + outcome.evals_fwdbwd[p]),
            ls_failures=int(outcome.ls_failures[p]),
            wall_time=wall_time,
            diverged_at=diverged_at,
            pruned=outcome.pruned[p],
        )
        final["ls_all_failed"] = 0 < final["ls_failures"] == epochs  # the search never found a step
        final["objective"] = math.nan if diverged_at is not None else final[objective]
        ended_at = outcome.ended_at[p]
        ended_at = now if math.isnan(ended_at) else float(ended_at)  # NaN: the loop stopped on an exception
        results.append(RunResult(Later(table.history, p), final, Later(outcome.model.member, p),
                                 Later(population.config, p), data, ended_at))  # fmt: skip
    return results


@torch.no_grad()
def final_metrics(model: MLP, data: Dataset) -> dict[str, list]:
    """Every member's final loss and accuracy on each split, and the splits' row counts: name -> P values."""
    n = model.layers[0][0].shape[0] if model.layers[0][0].dim() == 3 else 1
    measured, names = [], []
    for name, split in {"train": data.train, **data.evaluation_splits()}.items():
        device = model.layers[0][0].device
        Z = model(split.X.to(device))
        T, weights = split.T.to(device), split.weights
        weights = weights.to(device) if weights is not None else None
        measured += [model.loss(Z, T, weights).double().reshape(n),
                     model.accuracy(Z, T, weights).double().reshape(n)]  # fmt: skip
        rows = [len(split)] * n if weights is None else (weights > 0).sum(dim=(1, 2)).tolist()
        names += [(name, rows)]
    values = torch.stack(measured).cpu().tolist()
    final: dict[str, list] = {}
    for i, (name, rows) in enumerate(names):
        final[f"rows/{name}"] = rows
        final[f"{name}/loss"], final[f"{name}/acc"] = values[2 * i], values[2 * i + 1]
    return final


ALL_LINE_SEARCHES_FAILED = "every line search failed: no step met the Armijo condition"


def default_output_dir(cfg: DictConfig, run: MlflowRun | None) -> Path | None:
    """Hydra's job directory under gdlab-train; for a tracked gdlab.run, <tracking.dir>/outputs/<run>."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    if run is None:
        return None
    return Path(cfg.tracking.dir).resolve() / "outputs" / f"{run_name(cfg)}-{run.run_id[:8]}"


def save_outputs(result: RunResult, overrides: list[str], output_dir: Path, run: MlflowRun | None,
                 status: str, reason: str | None = None, config=None, history_written: bool = False,
                 population_size: int = 1) -> None:  # fmt: skip
    """History first (it is what an outage or a crash must not lose), then plots, then MLflow. A record that
    cannot be written (a full disk, a read-only folder) ends the run FAILED with the reason. `config`: what
    to save as the run's config (a population member's view of it; default result.config);
    `history_written`: its history.csv holds every row already (gdlab.artifacts.HistoryFiles);
    `population_size`: how many members trained with it (tracking.plots=auto draws a single run's PNGs)."""
    result.final["output_dir"] = str(output_dir)
    config = result.config if config is None else config
    problem = write_outputs(result, overrides, output_dir, config, history_written, population_size)
    if problem:  # the caller says so (gdlab-train's last line, gdlab.run's warning, the trial's failure)
        result.final["record_error"], status = problem, "FAILED"
    if run is None:
        return
    if problem or reason:  # an incomplete record says so first; else why the run was stopped
        run.set_tags({"failure.reason": problem or reason})
    if result.final["pruned"]:
        run.set_tags({"optuna.state": "PRUNED", "pruned.reason": result.final["pruned"],
                      "mlflow.runName": f"{run.name} (pruned)"})  # fmt: skip
    if result.final["diverged_at"] is not None:
        run.set_tags({"failure.reason": "loss became NaN/inf", "failure.epoch": result.final["diverged_at"]})
    if result.final["ls_all_failed"]:
        run.set_tags({"gdlab.warning": ALL_LINE_SEARCHES_FAILED})
    if not run.final_logged:  # logged already where its model was (log_trained_model)
        run.log_final(result.final)
    run.close(status, output_dir, end_time=result.ended_at)


def draws_plots(plots: bool | str, population_size: int) -> bool:
    """tracking.plots: true, false, or auto (a single run's PNGs, not each of a population's members': ~0.4 s
    a member, where a sweep's report compares them in one figure)."""
    return plots is True or (plots == "auto" and population_size == 1)


def write_outputs(result: RunResult, overrides: list[str], output_dir: Path, cfg,
                  history_written: bool = False, population_size: int = 1) -> str | None:  # fmt: skip
    """Write the run's files (history.csv unless `history_written`); what kept the record from being written
    (None: nothing)."""
    try:
        if not history_written:
            write_history(output_dir, result.history)
        masked_overrides = [mask_passwords(o) for o in overrides]
        plots = draws_plots(cfg.tracking.get("plots", "auto"), population_size)
        write_run_outputs(
            output_dir,
            masked_config_yaml(cfg),
            run_name(cfg),
            masked_overrides,
            result.history if plots else None,
            result.model,
            result.data,
            plots=plots,
        )
    except OSError as error:
        return record_error(error, output_dir)
    except Exception as error:  # a plot must never cost the run its history or its MLflow status
        log.warning("gdlab: could not write every artifact to %s: %s", output_dir, error)
    return None


def record_error(error: OSError, output_dir: Path) -> str:
    """An OSError as a run's failure reason: "no space left on device writing /path/history.csv"."""
    what = (error.strerror or type(error).__name__).lower()
    return f"{what} writing {error.filename or output_dir}"


def note_run(result: RunResult, run: MlflowRun) -> None:
    """Note the run on the result: known as soon as it exists, before its record is written."""
    result.final.update(mlflow_run_id=run.run_id, tracking_uri=mask_passwords(run.uri))


class PendingRecords:
    """Runs handed to the writer with all their record, whose writing the caller waits for later (`finish`):
    a sweep tells Optuna its trials meanwhile, while the writer process writes the batch's last rows and
    files on the other core. Each run is ended by the writer in order after its record, so FINISHED still
    means complete; what waits is only this process's knowledge of an outage (or of a dead writer, whose
    record it then writes itself)."""

    def __init__(self):
        self.pending: collections.deque[tuple[RunResult, MlflowRun]] = collections.deque()

    def add(self, result: RunResult, run: MlflowRun) -> None:
        self.pending.append((result, run))

    def finish(self) -> None:
        while self.pending:
            finish_tracking(*self.pending[0])  # interrupted, it stays pending for the next `finish`
            self.pending.popleft()


def finish_tracking(result: RunResult, run: MlflowRun) -> None:
    """Wait for the run's record to be written (by this process, if the writer died meanwhile); note the run
    (and any outage) on the result."""
    note_run(result, run)
    run.wait()
    if run.writer_died or run.outage:  # its curves are read back from the store, not taken as handed over
        forget(run.run_id)
    if run.writer_died:
        log.warning("gdlab: the metric writer process died; writing run %s's record from this process",
                    run.run_id)  # fmt: skip
        output_dir = result.final.get("output_dir")
        run.rewrite(result.history.to_dict("records"), result.final, Path(output_dir) if output_dir else None)
    result.final["tracking_outage"] = run.outage
    if run.outage:
        log.warning(
            "gdlab: the tracking backend failed during the run (%s); the full history is in %s",
            run.outage,
            result.final["output_dir"] + "/history.csv",
        )
