"""The engine's other processes: `--workers` K-1 more gdlab-sweep processes on the study, and the command
line a launcher's job runs (gdlab.sweep.jobs). Each is `gdlab-sweep NAME --worker ...`, joining the
invocation's study, budget and parent run; its overrides and storage URL go by environment, never on a
command line (`ps` shows those, and either may hold a password).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gdlab.sweep.spec import SweepSpec
from gdlab.sweep.study import STORAGE_ENV

OVERRIDES_ENV = "GDLAB_SWEEP_OVERRIDES"  # a worker's overrides, off its command line


def trial_shares(n_trials: int | None, workers: int) -> list[int | None]:
    """--n-trials N caps the whole invocation: N split over its processes (None: no cap)."""
    if n_trials is None:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def start_worker(args, spec: SweepSpec, study_name: str, storage_url: str, budget: int,
                 parent_run_id: str | None, index: int, n_trials: int | None):  # fmt: skip
    command = [sys.executable, "-m", "gdlab.sweep",
               *worker_arguments(args, spec, study_name, budget, parent_run_id, n_trials),
               "--worker-index", str(index)]  # fmt: skip
    return subprocess.Popen(command, env={**os.environ, **worker_environment(args, storage_url)})


def worker_arguments(args, spec: SweepSpec, study_name: str, budget: int, parent_run_id: str | None,
                     n_trials: int | None) -> list[str]:  # fmt: skip
    """A worker's gdlab-sweep arguments (all but its --worker-index): it joins this invocation's study,
    budget and parent run. Its overrides and storage URL go by environment (worker_environment)."""
    arguments = [args.name, "--worker",
                 *(["--config-dir", str(args.config_dir)] if args.config_dir else []),
                 "--study", study_name, "--budget", str(budget),
                 "--heartbeat-interval", str(args.heartbeat_interval),
                 "--grace-period", str(args.grace_period), "--population", str(spec.population),
                 "--processes", str(args.processes or args.workers),
                 "--replicates", str(spec.replicates),
                 "--progress", str(args.progress)]  # fmt: skip
    if parent_run_id:
        arguments += ["--parent-run-id", parent_run_id]
    if n_trials:
        arguments += ["--n-trials", str(n_trials)]
    if args.timeout:
        arguments += ["--timeout", str(args.timeout)]
    return arguments


def worker_environment(args, storage_url: str) -> dict[str, str]:
    """The storage URL (it may hold a password) goes by environment, so `ps` never shows it. So do the
    overrides: a tracking.uri=... among them may hold one too."""
    return {STORAGE_ENV: storage_url, OVERRIDES_ENV: json.dumps(args.overrides)}
