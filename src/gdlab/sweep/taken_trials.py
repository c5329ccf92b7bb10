"""Trials another process failed by heartbeat while this one was stopped (SIGSTOP, a suspended job, a paused
VM): Optuna retries each as a new trial, and the stopped process, once resumed, ends what it had of it KILLED,
says so in one line, and goes on with new trials."""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState

from gdlab.masking import error_line

TAKEN = "taken"  # an outcome: the trial was failed by heartbeat meanwhile, and retried by another process


def still_ours(trial: optuna.Trial) -> bool:
    """Whether the trial is still RUNNING in the storage (not failed by heartbeat by another process)."""
    return trial._trial_id in running_trial_ids(trial.study)


def running_trial_ids(study: optuna.Study) -> set[int]:
    return {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def taken_reason(trial: optuna.Trial) -> str:
    return (
        f"trial #{trial.number} was failed by heartbeat while its process was stopped (it is retried as "
        "another trial)"
    )


def say_taken(trial: optuna.Trial) -> None:
    """The line for a trial taken before it had a run (its process stopped between its ask and training)."""
    print(f"gdlab-sweep: {taken_reason(trial)}; going on with new trials", file=sys.stderr, flush=True)


def taken_from_us(trial: optuna.Trial, results: list, running: set[int] | None = None) -> bool:
    """Whether another process failed this trial by heartbeat while this one was stopped (`running`: the
    study's RUNNING trial ids, if known); then its runs (one per replicate) end KILLED with the reason, and
    one line says so (its retry is another trial)."""
    if trial._trial_id in (running if running is not None else running_trial_ids(trial.study)):
        return False
    reason = taken_reason(trial)
    for result in results:
        run_id = result.final.get("mlflow_run_id")
        if not run_id:
            continue
        from gdlab.stores import mlflow_client
        from gdlab.tracking import tracking_uri

        try:
            client = mlflow_client(tracking_uri(result.config))
            client.set_tag(run_id, "failure.reason", reason)
            client.set_terminated(run_id, status="KILLED")
        except Exception as error:  # the store's outage: the line below still says what happened
            reason += f"; its run could not be ended: {error_line(error)}"
    runs = "its run" if len(results) == 1 else "its runs"
    print(f"gdlab-sweep: {reason}; {runs} ended KILLED, going on with new trials", file=sys.stderr,
          flush=True)  # fmt: skip
    return True
