"""gdlab-sweep: run trials of a named sweep (sweeps/NAME.yaml) in-process through Optuna's own API.

On top of Hydra's Optuna sweeper plugin this adds pruning, a budget of finished trials across
invocations, an opt-in per-study lock (--exclusive), heartbeats and retries for dead trials, K worker
processes on one study (each one `python -m gdlab.sweep ... --worker`), and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import optuna

from gdlab import import_gc
from gdlab.config import TEST_METRICS, ConfigError
from gdlab.held_histories import drop, keep
from gdlab.interrupts import PENDING, InterruptHandler, deferred, failure_reason, not_an_interrupt
from gdlab.masking import error_line, install_log_masking, mask_passwords
from gdlab.metric_writer import MetricWriter
from gdlab.model_logger import ModelLogger
from gdlab.stores import import_client_modules, open_in_background
from gdlab.sweep.first_batch import enqueue_first_batch
from gdlab.sweep.jobs import JobLauncher, end_what_jobs_left, run_in_jobs
from gdlab.sweep.parent_run import (
    SweepEnd,
    end_parent_run,
    end_runs_left_here,
    finish_parent_run,
    repair_killed_runs,
    start_parent_run,
)
from gdlab.sweep.refit import SweepResult, best_trial_model, refit, wants_refit
from gdlab.sweep.selection import refit_enabled, selected_on
from gdlab.sweep.signature import ExperimentMismatch, check_same_experiment
from gdlab.sweep.spec import (
    SweepError,
    SweepSpec,
    available_sweeps,
    check_pbt_population,
    check_population_fits,
    load_sweep,
    sampler_for_stream,
    set_replicates,
)
from gdlab.sweep.study import (
    FINISHED,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    STORAGE_ENV,
    StudyLock,
    check_same_search_space,
    make_storage,
)
from gdlab.sweep.ui_link import sweep_view_lines
from gdlab.sweep.workers import (
    OVERRIDES_ENV,
    start_worker,
    trial_shares,
    worker_arguments,
    worker_environment,
)
from gdlab.tracking import PARENT_ENV, TrackingUnavailable, tracking_uri

STUDY_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,99}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="gdlab-sweep", description="Run trials of a named sweep with Optuna."
    )
    parser.add_argument("name", help=f"a sweep in sweeps/ ({', '.join(available_sweeps())})")
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for every trial, e.g. trainer.max_epochs=50"
    )
    parser.add_argument("--n-trials", type=int, help="run at most this many trials in this invocation")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: the sweep's, sqlite:///mlruns/optuna.db)"
    )
    parser.add_argument("--study", help="study name (default: the sweep's)")
    parser.add_argument(
        "--budget", type=int, help="finished trials the study should hold (default: the sweep's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this study (default 1)")
    parser.add_argument(
        "--config-dir", type=Path, help="an extra config root whose sweep/ folder holds more sweeps"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=HEARTBEAT_SECONDS,
        help=f"seconds between a running trial's heartbeats (default {HEARTBEAT_SECONDS})",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=GRACE_SECONDS,
        help=f"seconds without a heartbeat before a trial counts as dead (default {GRACE_SECONDS})",
    )
    parser.add_argument(
        "--population",
        type=int,
        help="trials asked and trained together as one batched model (default: the sweep's "
        "gdlab_sweep.population, else 1: one trial at a time)",
    )
    parser.add_argument(
        "--replicates",
        type=int,
        help="train each trial's configuration this many times, with seeds seed, seed+1, ... (the split "
        "stays fixed); its value is their gdlab_sweep.aggregate (default: the sweep's "
        "gdlab_sweep.replicates, else 1)",
    )
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="for scheduled jobs: do nothing (exit 0, a line on stderr) while another --exclusive "
        "gdlab-sweep on this machine runs the same study",
    )
    parser.add_argument(
        "--progress",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="while a trial or batch trains: a line this often when stdout is a log, a bar on a "
        "terminal (default 10; 0: none)",
    )
    parser.add_argument(
        "--no-refit",
        action="store_true",
        help="report the best trial's own test metrics instead of refitting its configuration on the "
        "training and validation rows and measuring the test split once (gdlab_sweep.refit: false)",
    )
    parser.add_argument(
        "--register",
        metavar="NAME",
        help="register the chosen model (the refit's) in MLflow's Model registry as a new version of NAME "
        "(as tracking.registered_model=NAME does)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=None, help=argparse.SUPPRESS)  # the invocation's
    parser.add_argument("--parent-run-id", help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def check_counts(args) -> None:
    """Counts and times must be positive (and finite) before anything starts."""
    counts = {"--workers": args.workers, "--n-trials": args.n_trials, "--budget": args.budget,
              "--population": args.population, "--replicates": args.replicates}  # fmt: skip
    checks = [(option, value, "an integer >= 1") for option, value in counts.items()]
    for option, value, allowed in [*checks, ("--timeout", args.timeout, "a finite number of seconds > 0")]:
        if value is not None and not (0 < value < math.inf):
            raise SweepError(f"{option}={value} is not allowed; use {allowed}")
    if not 0 <= args.progress < math.inf:
        raise SweepError(f"--progress={args.progress} is not allowed; use a finite number of seconds >= 0")


def check_study_name(name: str) -> None:
    """A study name becomes a directory (outputs/sweeps/<study>/) and an MLflow tag: one plain word."""
    if not STUDY_NAME.fullmatch(name):
        raise SweepError(f"--study={name!r} is not allowed; use letters, digits, '_', '-' and '.' "
                         "(not starting with '.'), at most 100 characters")  # fmt: skip


def main(argv: list[str] | None = None, jobs: JobLauncher | None = None) -> int:
    """gdlab-sweep. With `jobs` (hydra/sweeper=gdlab under a process launcher) the trials train in the
    launcher's jobs (gdlab.sweep.jobs), not in this process."""
    interrupts = InterruptHandler().install()
    try:
        if PENDING.signum is not None:  # a SIGTERM while this process imported: stop now
            interrupts(PENDING.signum, None)
        return sweep_main(argv, interrupts, jobs)
    except (KeyboardInterrupt, SystemExit):
        if interrupts.signum is None:
            raise
        print(f"gdlab-sweep: {failure_reason(interrupts)} before any trial started", file=sys.stderr)
        return interrupts.exit_code


def sweep_main(argv: list[str] | None, interrupts: InterruptHandler, jobs: JobLauncher | None) -> int:
    args = parse_args(argv)
    if args.worker and OVERRIDES_ENV in os.environ:
        args.overrides = json.loads(os.environ[OVERRIDES_ENV])
    install_log_masking()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Population mode asks trials itself and records their heartbeats itself (Heartbeats).
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # a signal is said once, by us, without a traceback
        handler.addFilter(not_an_interrupt)
    try:
        spec = load_sweep(args.name, args.overrides, args.config_dir)
        study_name, budget = args.study or spec.study_name, args.budget or spec.budget
        storage_url = args.storage or os.environ.get(STORAGE_ENV) or spec.storage
        check_counts(args)
        check_study_name(study_name)
        if args.register is not None and (not args.register.strip() or tracking_uri(spec.task) is None):
            raise SweepError(f"--register={args.register!r} is not allowed here; use a model name, with "
                             "tracking on (tracking=local or tracking=server): the model is on the refit's "
                             "run")  # fmt: skip
        if args.population is not None:
            spec.population = args.population
            if spec.pbt is not None:  # PBT copies within the population: its size is part of the experiment
                spec.signature["gdlab_sweep.population"] = json.dumps(args.population)
        if args.replicates is not None:
            set_replicates(spec, args.replicates, "--replicates")
        check_pbt_population(spec)
        check_population_fits(spec)
        spec.progress_every = args.progress
        if args.exclusive and not args.worker:
            lock = StudyLock(storage_url, study_name)
            if not lock.acquire():
                print(f"gdlab-sweep: --exclusive: study {study_name!r} is already being run on this machine "
                      f"by process {lock.holder()} (lock {lock.path}); not starting",
                      file=sys.stderr)  # fmt: skip
                return 0
        storage = make_storage(storage_url, args.heartbeat_interval, args.grace_period)
        study, created = create_or_load_study(study_name, storage, spec)
        check_same_search_space(study, spec)
        check_same_experiment(study, spec.signature)
        first_stream = created and not args.worker  # only the process that made the study reproduces it
        if first_stream:
            enqueue_first_batch(study, spec, min(budget, args.n_trials or budget))
        study.sampler = sampler_for_stream(spec, len(study.get_trials(deepcopy=False)), args.worker_index,
                                           first_stream)  # fmt: skip
    except (SweepError, ConfigError, ExperimentMismatch) as error:
        print(f"gdlab-sweep: error: {error}", file=sys.stderr)
        return 2
    try:
        return run_sweep(args, spec, study, storage, storage_url, budget, interrupts, jobs)
    except TrackingUnavailable as error:
        print(f"gdlab-sweep: error: {error}", file=sys.stderr)
        return 3


def create_or_load_study(name: str, storage, spec: SweepSpec) -> tuple[optuna.Study, bool]:
    """The study, and whether this process created it (of two processes starting together, one does)."""
    arguments = dict(study_name=name, storage=storage, sampler=spec.sampler, pruner=spec.pruner)
    try:
        try:
            study, created = optuna.create_study(**arguments, direction=spec.direction), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(**arguments), False
        if study.metric_names is None:  # optuna-dashboard's name for the value, not "Objective 0"
            study.set_metric_names([str(spec.task.objective)])
        return study, created
    except Exception as error:  # a read-only or full store: one line, not Optuna's traceback
        raise SweepError(f"study {name!r}: the Optuna storage refused it: {error_line(error)}") from error


def run_sweep(args, spec: SweepSpec, study: optuna.Study, storage, storage_url: str, budget: int,
              interrupts: InterruptHandler, jobs: JobLauncher | None) -> int:  # fmt: skip
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished >= budget:
        print(f"gdlab-sweep: study {study.study_name!r} holds {finished}/{budget} finished trials: "
              "budget reached")  # fmt: skip
        return 0
    print(f"gdlab-sweep: study {study.study_name!r} in {mask_passwords(storage_url)}: "
          f"{finished}/{budget} finished trials", flush=True)  # fmt: skip
    if not args.parent_run_id:  # a new store is created while Lightning loads (by the writer's calls)
        open_in_background(tracking_uri(spec.task), here=jobs is not None)
    if jobs is None:  # the metric writer imports MLflow on the other core while Lightning loads here
        MetricWriter.start(tracking_uri(spec.task))
        import gdlab.sweep.trials  # noqa: F401
    if (args.parent_run_id or jobs) and tracking_uri(spec.task) is not None:  # frozen with the rest
        import_client_modules(tracking_uri(spec.task))
    import_gc.resume()  # this process's imports are done (gdlab.import_gc): an invocation's has no MLflow

    parent_run_id, workers, end = args.parent_run_id, [], None
    try:  # from here on a signal ends what was started: trials FAIL, runs and the parent run KILLED
        if parent_run_id:
            os.environ[PARENT_ENV] = parent_run_id
        elif tracking_uri(spec.task) is not None:
            tags = {"optuna.study": study.study_name, "optuna.storage": storage_url, "sweep": spec.name}
            name = f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if jobs is None:  # forked with Lightning here, it imports MLflow while the trials train
                ModelLogger.start()  # for the refit's model (gdlab.model_logger)
            parent_run_id = start_parent_run(spec.task, name=name, tags=tags)  # ended by it if stopped there
            ModelLogger.open_store(tracking_uri(spec.task))  # made by now
            repair_killed_runs(spec.task, study)
        if jobs is not None:
            failure = run_in_jobs(
                jobs, study, budget, spec.population,
                lambda n: worker_arguments(args, spec, study.study_name, budget, parent_run_id, n),
                worker_environment(args, storage_url),
            )  # fmt: skip
        else:
            failure = run_here(args, spec, study, storage, storage_url, budget, parent_run_id, workers)
        end = start_sweep_end(spec, study, parent_run_id) if not args.worker and parent_run_id else None
        result = None if args.worker else sweep_result(args, spec, study, parent_run_id)
        if end is not None:
            finish_sweep(spec, parent_run_id, result, end)
    except (KeyboardInterrupt, SystemExit):
        if end is not None:
            end.cancel()
        if interrupts.signum is None:
            raise
        return stop_interrupted(args, spec, parent_run_id, workers, interrupts, (jobs, study, storage))
    except Exception as error:
        if end is not None:  # the drawing children and the plots' folder go with the command
            end.cancel()
        if parent_run_id and not args.worker and not isinstance(error, TrackingUnavailable):  # ends FAILED
            with deferred(), contextlib.suppress(Exception):  # a signal meanwhile comes after it
                end_parent_run(
                    spec.task, parent_run_id, "FAILED", f"{type(error).__name__}: {error_line(error)}"
                )
        raise
    finally:
        drop()  # the trials' curves held for the report (gdlab.held_histories), however the sweep ended
        ModelLogger.stop()
    if failure:
        print(f"gdlab-sweep: {failure}", file=sys.stderr)
        return 1
    total = len(study.get_trials(deepcopy=False, states=FINISHED))
    try:
        print(
            f"gdlab-sweep: done: {total}/{budget} finished trials; best {spec.task.objective} "
            f"{study.best_value:.6g} (trial #{study.best_trial.number}) with {study.best_trial.params}"
        )
    except ValueError:
        print(f"gdlab-sweep: done: {total}/{budget} finished trials; none completed")
    if result is not None and result.model:
        print(f"gdlab-sweep: the chosen model: {result.model}")
    if result is not None:
        print(f"gdlab-sweep: {result.line()}", flush=True)
    return 0


def run_here(args, spec: SweepSpec, study: optuna.Study, storage, storage_url: str, budget: int,
             parent_run_id: str | None, workers: list) -> str | None:  # fmt: skip
    """Trials trained by this process and its --workers (K-1 more processes, appended to `workers`) until
    the budget; a failure line, or None."""
    shares = trial_shares(args.n_trials, args.workers)
    args.n_trials = shares[0]
    for index, share in enumerate(shares[1:], start=1):  # each held as it starts: a signal stops it too
        if share != 0:
            workers.append(start_worker(args, spec, study.study_name, storage_url, budget, parent_run_id,
                                        index, share))  # fmt: skip
    from gdlab.report.runs import is_curve_metric
    from gdlab.sweep.trials import TrialLogger, run_population_batches

    if parent_run_id and not args.worker:  # the report draws the curves this process hands MLflow
        keep(is_curve_metric)
    logger = TrialLogger(budget, spec.max_failure_rate)
    run_population_batches(spec, study, storage, args, budget, logger)  # one loop for every population size
    failed = [code for code in (worker.wait() for worker in workers) if code != 0]
    if logger.failure_rate > spec.max_failure_rate:
        return f"failure rate {logger.failure_rate:.0%} is over {spec.max_failure_rate:.0%}"
    if failed:
        return f"{len(failed)} worker process(es) failed (exit status {failed[0]})"
    return None


def sweep_result(args, spec: SweepSpec, study: optuna.Study, parent_run_id: str | None) -> SweepResult | None:
    """The sweep's answer: the best trial (by the objective) refit on train + val, its test split measured
    once; or, without a refit, the best trial's own test metrics. None before any trial completed."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    from gdlab.sweep.trials import chosen_config

    cfg, overrides = chosen_config(spec, best)
    trial = f"trial #{best.number}"
    register = args.register or spec.task.tracking.get("registered_model")
    if wants_refit(cfg) and refit_enabled(spec.task) and not args.no_refit:
        print(f"gdlab-sweep: refit of {trial} ({spec.task.objective} {best.value:.6g}) on its train + val "
              "rows", flush=True)  # fmt: skip
        output_dir = Path("outputs") / "sweeps" / study.study_name / f"refit-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            return refit(cfg, overrides, output_dir, trial, parent_run_id, register)
        except TrackingUnavailable:
            raise
        except Exception as error:  # the trials stand; the result falls back to the best trial's own
            print(f"gdlab-sweep: the refit of {trial} failed ({type(error).__name__}: {error_line(error)}); "
                  "reporting the trial's own test metrics", file=sys.stderr)  # fmt: skip
    final = best.user_attrs.get("final", {})
    metrics = {key: final[key] for key in TEST_METRICS if key in final}
    if not metrics:
        return None
    run_id = best.user_attrs.get("mlflow_run_id")
    weights = Path("outputs") / "sweeps" / study.study_name / f"trial-{best.number}" / "weights.pt"
    model = best_trial_model(cfg, run_id, weights, final, register) if parent_run_id else None
    return SweepResult(metrics, trial, False, selected_on(spec.task), run_id=run_id, model=model)


def start_sweep_end(spec: SweepSpec, study: optuna.Study, parent_run_id: str) -> SweepEnd:
    """Once the trials are done: runs dead processes left RUNNING repaired, then the children read and the
    report's figures and Optuna's plots drawn while the refit trains (gdlab.sweep.parent_run.SweepEnd)."""
    repaired = repair_killed_runs(spec.task, study)
    if repaired:
        print(f"gdlab-sweep: ended {repaired} MLflow run(s) left RUNNING by dead processes as KILLED")
    report_dir = Path("outputs") / "sweeps" / study.study_name / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    return SweepEnd(spec.task, parent_run_id, report_dir, study)


def finish_sweep(spec: SweepSpec, parent_run_id: str, result: SweepResult | None, end: SweepEnd) -> None:
    """The parent run's end: the best child, the result, the comparison report, Optuna's plots."""
    finish_parent_run(spec.task, parent_run_id, result=result, end=end)
    for line in sweep_view_lines(spec.task, parent_run_id, list(spec.distributions)):
        print(f"gdlab-sweep: {line}", flush=True)


def stop_interrupted(args, spec: SweepSpec, parent_run_id: str | None, workers: list,
                     interrupts: InterruptHandler, launched: tuple = (None, None, None)) -> int:  # fmt: skip
    """After SIGTERM/SIGINT: the workers (or the launcher's jobs) get the same signal (a `kill PID` reaches
    this process only), the parent run ends KILLED, one line says what happened, exit 128 + signal."""
    jobs, study, storage = launched
    if jobs is not None:
        jobs.stop()
        try:
            end_what_jobs_left(tracking_uri(spec.task), study, storage, parent_run_id,
                               failure_reason(interrupts))  # fmt: skip
        except Exception as error:  # an outage: the heartbeat and the next gdlab command repair them
            print(f"gdlab-sweep: could not end the jobs' trials: {error_line(error)}", file=sys.stderr)
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(interrupts.signum)
    for worker in workers:
        worker.wait()
    reason = failure_reason(interrupts)
    has_parent = parent_run_id and not args.worker
    if has_parent:
        try:
            end_parent_run(spec.task, parent_run_id, "KILLED", reason)
        except Exception as error:  # an outage: the next gdlab command repairs the run
            print(f"gdlab-sweep: could not end the parent run: {error_line(error)}",
                  file=sys.stderr)  # fmt: skip
    elif parent_run_id:  # a worker: the runs it left RUNNING (its own process's), not the parent
        with contextlib.suppress(Exception):
            end_runs_left_here(spec.task, parent_run_id, reason)
    runs = "their MLflow runs and the sweep's parent run" if has_parent else "their runs"
    print(f"gdlab-sweep: {reason}: the running trial(s) are FAIL in Optuna, {runs} ended KILLED; "
          "finished trials are kept", file=sys.stderr)  # fmt: skip
    return interrupts.exit_code
