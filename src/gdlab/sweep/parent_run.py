"""One MLflow parent run per sweep invocation; every trial's run is its child.

Hydra multirun (basic or Optuna sweeper) reaches this through `MlflowSweepCallback`, registered in
conf/config.yaml; `gdlab-sweep` calls `start_parent_run` / `finish_parent_run` itself. The parent's
id reaches the trials through the GDLAB_MLFLOW_PARENT_RUN_ID environment variable, so launchers
that start jobs in other processes on this machine see it too.

Light on purpose (no Optuna, torch or gdlab.sweep's other modules at import): Hydra instantiates the
callback in every gdlab-train process.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gdlab import import_gc, system_metrics
from gdlab.experiments import experiment_of_run
from gdlab.interrupts import deferred, interruption_reason
from gdlab.masking import error_line, install_log_masking, mask_passwords, mask_saved_hydra_configs
from gdlab.repair import end_runs_of_this_process, trial_states
from gdlab.sweep.optuna_jobs import note_run_on_trial
from gdlab.sweep.selection import refit_enabled, selected_on
from gdlab.tracking import (
    PARENT_ENV,
    REFIT_ROLE,
    RESULT_TAG,
    ROLE_TAG,
    SELECTED_ON_TAG,
    TrackingUnavailable,
    artifact_root,
    experiment_name,
    tracking_uri,
)
from gdlab.writer_client import WriterClient, log_plain_batch

if TYPE_CHECKING:
    import optuna

    from gdlab.sweep.refit import SweepResult


def start_parent_run(cfg: DictConfig, name: str, tags: dict | None = None) -> str | None:
    """Create the sweep's parent run (None when tracking is off) and export its id to the trials."""
    uri = tracking_uri(cfg)
    if uri is None:
        return None

    from gdlab.repair import process_tags

    masked = {k: mask_passwords(str(v)) for k, v in (tags or {}).items()}
    tags = {"gdlab.kind": "sweep", **process_tags(), **masked}
    run_id = None
    experiment = [experiment_name(cfg), artifact_root(cfg, uri)]
    try:
        with deferred():  # a signal while MLflow makes it comes once its id is held, to end it
            run_id = WriterClient(uri).create_run(name, tags, experiment=experiment)
        os.environ[PARENT_ENV] = run_id
        system_metrics.start(cfg, uri, run_id)
    except BaseException as stop:
        signalled = isinstance(stop, KeyboardInterrupt | SystemExit)
        if run_id is not None:  # made, but stopped before the caller holds it
            with contextlib.suppress(Exception):
                end_parent_run(cfg, run_id, "KILLED" if signalled else "FAILED",
                               interruption_reason(stop) if signalled else error_line(stop))  # fmt: skip
        if signalled or run_id is not None:
            raise
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking backend at {mask_passwords(uri)}: {error_line(stop)}"
        ) from stop
    return run_id


class SweepEnd:
    """A sweep's end, begun as soon as its trials are done: its child runs read once, and the report's curve
    figures and Optuna's plots (with `study`) drawn in forked children while the refit trains here
    (gdlab.forked); `finish_parent_run` ends it. Optuna's plots start first: they need only the study, so
    they draw on another core while the children are read, not beside the refit."""

    def __init__(self, cfg: DictConfig, parent_run_id: str, report_dir: str | Path | None = None,
                 study: optuna.Study | None = None):  # fmt: skip
        from gdlab.held_histories import drop
        from gdlab.report.runs import search_all_runs

        self.report, self.plots = None, None
        if study is not None:
            from gdlab.report.figures import load_matplotlib
            from gdlab.sweep.study_plots import StudyPlots

            load_matplotlib()  # once, here: both drawing children inherit it
            self.plots = StudyPlots(study)
        try:
            client = WriterClient(tracking_uri(cfg))  # the writer process's calls: no MLflow here
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            self.children = search_all_runs(client, experiment_id,
                                            f"tags.mlflow.parentRunId = '{parent_run_id}'")  # fmt: skip
            self.report = start_parent_report(cfg, parent_run_id, report_dir, self.children, client)
        except BaseException:
            self.cancel()
            raise
        drop()  # the trials' curves this process held for it (gdlab.held_histories)

    def cancel(self) -> None:
        """Stop what is being drawn (the sweep ends without its record)."""
        if self.report is not None:
            self.report.curves.cancel()
        if self.plots is not None:
            self.plots.cancel()


def finish_parent_run(cfg: DictConfig, parent_run_id: str, report_dir: str | Path | None = None,
                      result: SweepResult | None = None, end: SweepEnd | None = None) -> dict:  # fmt: skip
    """Record the best child (by cfg.objective and cfg.direction), the sweep's result (the refit's test
    metrics, gdlab.sweep.refit), the comparison report and Optuna's plots on the parent, and close it."""

    os.environ.pop(PARENT_ENV, None)
    client = WriterClient(tracking_uri(cfg))
    end = end or SweepEnd(cfg, parent_run_id, report_dir)
    children = trial_runs(end.children)
    summary = best_child(children, f"final/{cfg.objective}", cfg.direction)
    batch = parent_summary(cfg, children, summary, result)
    log_plain_batch(client, parent_run_id, *batch)  # one write, whole
    finish_parent_report(end.report)
    if end.plots is not None:
        try:
            end.plots.log(client, parent_run_id)
        except Exception as error:  # the plots are extra: the run's record is its children and the report
            print(f"gdlab-sweep: no Optuna plots: {error_line(error)}")
    system_metrics.stop(parent_run_id)
    finished = any(run.info.status == "FINISHED" for run in children)
    client.set_terminated(parent_run_id, status="FINISHED" if finished or not children else "FAILED")
    return summary


def trial_runs(children: list) -> list:
    """The sweep's trials among a parent's children: not the refit of the chosen one."""
    return [run for run in children if run.data.tags.get(ROLE_TAG) != REFIT_ROLE]


def parent_summary(cfg: DictConfig, children: list, summary: dict,
                   result: SweepResult | None) -> tuple[list, list, list]:  # fmt: skip
    """What the parent records of its sweep, as log_batch's (metrics, params, tags) in plain tuples
    (gdlab.writer_client.log_plain_batch): the trials' counts, the split they were ranked on, the best child
    (its value, id, name and the params the sweep varied), and the sweep's answer (result/test/<metric>,
    where it was measured, the line)."""
    finished = sum(run.info.status == "FINISHED" for run in children)
    metrics = {"sweep/trials": len(children), "sweep/finished": finished}
    params, tags = {}, {SELECTED_ON_TAG: selected_on(cfg)}
    if summary:
        best = summary["run"]
        metrics[f"best/{cfg.objective}"] = summary["value"]
        params = {"objective": cfg.objective, "direction": cfg.direction}
        tags |= {"best.run_id": best.info.run_id, "best.run_name": best.info.run_name}
        tags |= {f"best.{key}": value for key, value in varied_params_of(best, children).items()}
        if "pbt.replay" in best.data.tags:  # a PBT member: the schedule it ended with, as a single run
            tags["best.pbt.replay"] = best.data.tags["pbt.replay"]
    if result is not None:
        metrics |= {f"result/{key}": value for key, value in result.metrics.items()}
        tags |= {"result.source": "refit" if result.refit else "best trial", "result.trial": result.trial,
                 RESULT_TAG: result.label(), "result.run_id": result.run_id or ""}  # fmt: skip
    now = int(time.time() * 1000)
    return ([(key, value, now, 0) for key, value in metrics.items()],
            [(key, str(value)) for key, value in params.items()],
            [(key, str(value)) for key, value in tags.items()])  # fmt: skip


def end_parent_run(cfg: DictConfig, parent_run_id: str, status: str, reason: str) -> None:
    """Close the parent early (an interrupted sweep): `status` with the reason as a tag, and any run this
    process left RUNNING beside it (gdlab.repair.end_runs_of_this_process)."""
    os.environ.pop(PARENT_ENV, None)
    client = WriterClient(tracking_uri(cfg))  # after what the writer holds: its end comes first, then this
    if client.get_run(parent_run_id).info.status == "RUNNING":  # not one that ended FINISHED meanwhile
        client.set_tag(parent_run_id, "failure.reason", reason)
        system_metrics.stop(parent_run_id)
        client.set_terminated(parent_run_id, status=status)
    end_runs_left_here(cfg, parent_run_id, reason)


def end_runs_left_here(cfg: DictConfig, parent_run_id: str, reason: str) -> int:
    """KILLED, with the reason: the runs this process left RUNNING in the sweep's experiment (a worker's)."""
    client = WriterClient(tracking_uri(cfg))
    return end_runs_of_this_process(client, experiment_of_run(client, parent_run_id), reason)


def start_parent_report(cfg: DictConfig, parent_run_id: str, report_dir: str | Path | None,
                        children: list, client=None):  # fmt: skip
    """gdlab-report on the sweep's children, begun (gdlab.report.build.start_report); None without
    children or where it cannot be made (a failure here costs only the report)."""
    if not children:
        return None
    from gdlab.report.build import start_report

    try:
        return start_report(parent_run_id, tracking_uri=tracking_uri(cfg), out=report_dir,
                            objective=f"final/{cfg.objective}", children=children, client=client)  # fmt: skip
    except Exception as error:
        print(f"gdlab: no sweep report: {error_line(error)}")
        return None


def finish_parent_report(pending) -> None:
    """The begun report ended (its objective figure carries the result the parent holds now) and logged
    to the parent."""
    if pending is None:
        return
    from gdlab.report.build import finish_report

    try:
        report = finish_report(pending)
        print(f"gdlab: sweep report in {report.paths[0].parent}")
    except Exception as error:
        print(f"gdlab: no sweep report: {error_line(error)}")


def best_child(children: list, objective: str, direction: str) -> dict:
    """The child with the best final objective among those that finished with a finite value."""
    scored = [
        (run.data.metrics[objective], run)
        for run in children
        if run.info.status == "FINISHED" and math.isfinite(run.data.metrics.get(objective, math.nan))
    ]
    if not scored:
        return {}
    pick = min if direction == "minimize" else max
    value, run = pick(scored, key=lambda pair: pair[0])
    return {"value": value, "run": run}


def varied_params_of(run, children: list) -> dict:
    """The params of `run` that the sweep varied among `children` (gdlab-report's rule)."""
    from gdlab.report.tables import differing_keys

    varying = differing_keys([child.data.params for child in children])
    return {k: run.data.params[k] for k in varying if k in run.data.params}


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent run around every multirun, closed with the best child's result."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        install_log_masking()  # Hydra logs every job's overrides

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from gdlab import train

        import_gc.resume()  # a launcher's jobs may train in other processes: this one's imports are done
        mask_saved_hydra_configs(Path(str(config.hydra.sweep.dir)))
        train.stopped_by = None  # this multirun's
        if config.hydra.runtime.choices.get("hydra/sweeper") == "gdlab":
            return  # gdlab.sweep.hydra_sweeper: gdlab-sweep's engine checks and records the sweep itself
        cfg = _task_config(config)
        check_multirun_selection(cfg)
        check_optuna_study(config, cfg)
        if cfg.tracking.backend == "none":
            return
        sweep_dir = config.hydra.sweep.dir
        overrides = " ".join(config.hydra.overrides.task)
        self.parent_run_id = start_parent_run(
            cfg,
            name=f"sweep-{os.path.basename(str(sweep_dir))}",
            tags={
                "gdlab.sweep_dir": sweep_dir,
                "overrides": overrides,
                "sweeper": config.hydra.sweeper.get("_target_", ""),
            },  # fmt: skip
        )

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """In the job's own process: name the job's MLflow run on its Optuna trial (optuna-dashboard)."""
        from gdlab import train

        run_id, train.last_mlflow_run_id = train.last_mlflow_run_id, None
        if run_id and config.hydra.mode == RunMode.MULTIRUN:
            note_run_on_trial(config, list(job_return.overrides or []), run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from gdlab import train

        mask_saved_hydra_configs(Path(str(config.hydra.sweep.dir)))  # Hydra's multirun.yaml
        stop = sys.exc_info()[1]  # Hydra calls this in a `finally`: a Ctrl-C outside the jobs comes as this
        stopped_by = train.stopped_by or (
            interruption_reason(stop) if isinstance(stop, KeyboardInterrupt) else None
        )
        if self.parent_run_id and stopped_by:  # a job, or the sweep, was stopped by a signal: no refit
            self.end_killed(_task_config(config), stopped_by)
            train.stopped_by = stopped_by  # said: gdlab.entry then exits 128 + the signal, quietly
        if self.parent_run_id:
            sweep_dir, task = Path(str(config.hydra.sweep.dir)), _task_config(config)
            end = None
            try:
                end = SweepEnd(task, self.parent_run_id, sweep_dir / "report")  # drawn while the refit trains
                result = multirun_result(task, self.parent_run_id, sweep_dir / "refit", end.children)
            except Exception as error:  # the jobs stand; the parent still ends with its best child and report
                print(f"gdlab-train: no refit: {error_line(error)}")
                result = None
            except BaseException as stop:  # a signal during the refit
                if end is not None:
                    end.cancel()
                self.end_killed(task, interruption_reason(stop))
                raise
            finish_parent_run(task, self.parent_run_id, sweep_dir / "report", result, end)
            print(f"gdlab-train: {parent_line(task, self.parent_run_id)}")
            if result is not None:
                print(f"gdlab-train: {result.line()}", flush=True)
            self.parent_run_id = None

    def end_killed(self, task: DictConfig, reason: str) -> None:
        try:  # the parent, and what this process left RUNNING, ended KILLED with the reason
            end_parent_run(task, self.parent_run_id, "KILLED", reason)
        except Exception as error:  # an outage: the next gdlab command repairs the run
            print(f"gdlab-train: could not end the parent run: {error_line(error)}", file=sys.stderr)
        print(f"gdlab-train: {reason}: the sweep's parent run {self.parent_run_id} ended KILLED",
              file=sys.stderr)  # fmt: skip
        self.parent_run_id = None


def parent_line(task: DictConfig, parent_run_id: str) -> str:
    """Where a sweep's record is, and the command that compares its trials."""
    where = f"experiment '{experiment_name(task)}' at {mask_passwords(tracking_uri(task))}"
    return f"parent run {parent_run_id} in {where}; compare its trials: gdlab-report {parent_run_id}"


def multirun_result(task: DictConfig, parent_run_id: str, output_dir: Path,
                    children: list) -> SweepResult | None:  # fmt: skip
    """`gdlab-train -m`'s result: its best job among the parent's `children` (by the objective, from MLflow)
    refit from the config and overrides Hydra saved in the job's folder, or that job's own test metrics.
    None without a finished job."""
    from gdlab.config import TEST_METRICS, validate
    from gdlab.sweep.refit import SweepResult, refit, wants_refit
    from gdlab.tracking import OUTPUT_DIR_TAG

    best = best_child(trial_runs(children), f"final/{task.objective}", task.direction).get("run")
    if best is None:
        return None
    job_dir = Path(best.data.tags.get(OUTPUT_DIR_TAG, ""))
    trial = f"job #{job_dir.name}" if job_dir.name else f"run {best.info.run_id[:8]}"
    saved = job_dir / ".hydra" / "config.yaml"
    if refit_enabled(task) and saved.is_file():
        cfg = OmegaConf.load(saved)
        cfg.tracking = task.tracking  # the saved one is masked; the sweep's own is this process's
        cfg = validate(cfg)
        if wants_refit(cfg):
            overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
            print(
                f"gdlab-train: refit of {trial} ({task.objective} "
                f"{best.data.metrics[f'final/{task.objective}']:.6g}) on its train + val rows",
                flush=True,
            )
            return refit(cfg, overrides, output_dir, trial, parent_run_id)
    metrics = {key: best.data.metrics[f"final/{key}"] for key in TEST_METRICS
               if f"final/{key}" in best.data.metrics}  # fmt: skip
    if not metrics:
        return None
    return SweepResult(metrics, trial, False, selected_on(task), run_id=best.info.run_id)


def check_multirun_selection(task: DictConfig) -> None:
    """A multirun ranks its jobs by the objective (its parent's best child): not on the test split, unless
    it says so knowingly (gdlab.sweep.selection); a refusal is one line on stderr and exit status 2."""

    from gdlab.config import ConfigError
    from gdlab.sweep.selection import check_selection, refit_enabled

    try:
        check_selection(task)
        refit_enabled(task)
    except ConfigError as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(2)


def check_optuna_study(config: DictConfig, task: DictConfig) -> None:
    """Hydra's Optuna sweeper on a stored study: the same experiment signature as gdlab-sweep writes and
    checks (gdlab.sweep.signature); a different one is one line on stderr and exit status 2. So is a sweep
    with a gdlab_sweep.pbt block: only gdlab's engine trains its populations with PBT."""

    if OmegaConf.select(task, "gdlab_sweep.pbt") is not None:
        print("gdlab-train: error: this sweep has a gdlab_sweep.pbt block, which gdlab's engine runs (PBT "
              "needs its trials trained together); hydra/sweeper=optuna would train them one by one without "
              "PBT. Use hydra/sweeper=gdlab (the sweep files' default) or gdlab-sweep NAME",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    sweeper = config.hydra.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")) or not sweeper.get("storage"):
        return
    if not sweeper.get("study_name") or OmegaConf.is_list(sweeper.get("direction")):
        return  # a new auto-named study each time, or a multi-objective one: nothing to join
    import optuna

    from gdlab.sweep.signature import ExperimentMismatch, check_same_experiment, experiment_signature
    from gdlab.sweep.spec import SweepError
    from gdlab.sweep.study import make_storage

    study_name = sweeper.study_name
    direction = getattr(sweeper.direction, "name", str(sweeper.direction)).lower()
    signature = experiment_signature(task, sweeper.get("params"), list(config.hydra.overrides.task))
    try:
        storage = make_storage(str(sweeper.storage))  # the folder of a new SQLite file, made safely
        study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                    load_if_exists=True)  # fmt: skip
        check_same_experiment(study, signature)
    except (ExperimentMismatch, SweepError) as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(2)


def _task_config(config: DictConfig) -> DictConfig:
    """The sweep-level config without the hydra node (trial values are not applied here)."""
    container = OmegaConf.to_container(config, resolve=False)
    container.pop("hydra", None)
    return OmegaConf.create(container)


def repair_killed_runs(task: DictConfig, study: optuna.Study) -> int:
    """End as KILLED the MLflow runs left RUNNING by trials whose process died (their trial is over)."""
    uri = tracking_uri(task)
    if uri is None:
        return 0

    try:
        return WriterClient(uri).end_runs_of_dead_trials(study.study_name, trial_states(study))
    except Exception as error:  # repairing is housekeeping: it never stops a sweep
        print(f"gdlab-sweep: could not repair MLflow runs: {error_line(error)}")
        return 0
