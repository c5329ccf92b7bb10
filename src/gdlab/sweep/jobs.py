"""Trials trained by the jobs of a launcher (`hydra/sweeper=gdlab` with submitit, SLURM, ...).

Each job is a gdlab-sweep worker: it joins the invocation's study, trains its share of the trials in
population batches, reports to the study's storage (so the sweep's pruner stops its trials there, in the
job) and records its runs under the invocation's parent run. The invocation launches the jobs and waits
for them, then launches again while the budget is not reached (a diverged or lost trial does not count)
and the last launch added finished trials.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Protocol

import optuna

from gdlab.sweep.study import FINISHED


class JobLauncher(Protocol):
    """What runs the jobs. `jobs_at_once` is how many one launch starts (hydra.sweeper.n_jobs)."""

    jobs_at_once: int

    def launch(self, arguments: list[str], environment: dict[str, str], count: int) -> list[int]:
        """Run `count` jobs, each `gdlab-sweep *arguments --worker-index I` (I distinct across all
        launches) with `environment` added to its own; wait for them; their exit statuses."""
        ...

    def stop(self) -> None:
        """After a signal to this process: stop the jobs still running and wait for them."""
        ...


def job_shares(remaining: int, population: int, jobs_at_once: int) -> tuple[int, int]:
    """(jobs, trials per job) for `remaining` trials: whole population batches per job, at most
    `jobs_at_once` jobs. With jobs_at_once >= remaining / population, each job trains one batch."""
    batches = math.ceil(remaining / population)
    jobs = min(jobs_at_once, batches)
    return jobs, math.ceil(batches / jobs) * population


def run_in_jobs(launcher: JobLauncher, study: optuna.Study, budget: int, population: int,
                worker_arguments, environment: dict[str, str]) -> str | None:  # fmt: skip
    """Launch until the study holds `budget` finished trials. `worker_arguments(n_trials)` is a job's
    gdlab-sweep command line. A failure line, or None."""
    while True:
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if finished >= budget:
            return None
        jobs, per_job = job_shares(budget - finished, population, launcher.jobs_at_once)
        print(f"gdlab-sweep: launching {jobs} job(s) of up to {per_job} trials (batches of {population}); "
              f"{finished}/{budget} finished trials", flush=True)  # fmt: skip
        statuses = launcher.launch(worker_arguments(per_job), environment, jobs)
        failed = [status for status in statuses if status != 0]
        if failed:
            return f"{len(failed)} of {jobs} job(s) failed (exit status {failed[0]}); see their logs"
        if len(study.get_trials(deepcopy=False, states=FINISHED)) == finished:
            return "the launched jobs finished no trial"


def stop_local_jobs(timeout: float = 300) -> None:
    """A launcher's local processes (submitit_local's, joblib's) are this process's descendants in its
    own process group: a signal to the group reached them already, a `kill PID` did not. They get SIGTERM
    (a second SIGINT would interrupt submitit's controller in its own cleanup); then wait until they have
    ended their trials and exited. (A new store's maker runs in a session of its own and is left alone;
    remote jobs, a SLURM array's, are not here to see.)"""
    jobs = local_job_processes()
    for pid in jobs:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while jobs and time.monotonic() < deadline:
        jobs = [pid for pid in jobs if is_alive(pid)]
        time.sleep(0.2)


def local_job_processes() -> list[int]:
    """This process's descendants in its process group (Linux /proc; elsewhere none)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        stat = process_stat(int(entry)) if entry.isdigit() else None
        if stat is not None and stat[2] == os.getpgrp():
            parents[int(entry)] = stat[1]
    ours, found = {os.getpid()}, True
    while found:
        found = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                found = True
    return sorted(ours - {os.getpid()})


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) from /proc/PID/stat; None once it is gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2])


def is_alive(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def end_what_jobs_left(tracking_uri: str | None, study: optuna.Study, storage, parent_run_id: str | None,
                       reason: str) -> int:  # fmt: skip
    """After the local jobs are gone: a trial of theirs (one with a run under this invocation's parent)
    still RUNNING ends FAIL, and a run of theirs still RUNNING ends KILLED, as the job itself would have
    done had it had the time (submitit's controller follows Ctrl-C with SIGKILL a second later). The
    number of trials and runs ended. (Without a parent run the heartbeat's grace period fails them.)"""
    from optuna.trial import TrialState

    from gdlab.stores import mlflow_client

    if tracking_uri is None or parent_run_id is None:
        return 0
    client = mlflow_client(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    theirs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    ended = 0
    for run in theirs:
        trial = running.get(int(run.data.tags.get("optuna.trial", -1)))
        if trial is not None:
            storage.set_trial_user_attr(trial._trial_id, "failure", f"its job was stopped: {reason}")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            ended += 1
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "failure.reason", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            ended += 1
    return ended
