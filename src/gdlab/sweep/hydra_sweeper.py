"""`hydra/sweeper=gdlab`: `gdlab-train -m +sweep=NAME hydra/sweeper=gdlab ...` runs the sweep with the engine
behind `gdlab-sweep NAME ...` (gdlab.sweep.cli): Optuna's ask and tell with the sweep's sampler and pruner,
population batches, replicates and folds, PBT, the budget across invocations, heartbeats, signals, one MLflow
parent run with the trials as children, the refit and the report. The sweep file's `hydra.sweeper`
settings (and any `hydra.sweeper.*` given on the command line) are read as gdlab-sweep reads them.

With Hydra's basic launcher the trials train in this process. With a process launcher (submitit_local,
submitit_slurm, gdlab_slurm, joblib) they train in its jobs, each a gdlab-sweep worker that trains whole
population batches and reports to the study's storage, where the pruner stops its trials
(gdlab.sweep.jobs); `hydra.sweeper.n_jobs` is how many jobs one launch starts.

Hydra finds this plugin by its entry point (group `hydra.plugins`, pyproject.toml), which works in editable
installs too; importing it stores its config as `hydra/sweeper=gdlab`. The config has the Optuna sweeper's
fields, so every shipped sweep file composes with either sweeper.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING, DictConfig, OmegaConf

TARGET = "gdlab.sweep.hydra_sweeper.GdlabSweeper"
IN_PROCESS_LAUNCHERS = ("basic",)  # the engine trains its batches itself; other launchers run jobs
JOB_ARGUMENTS_ENV = "GDLAB_SWEEP_JOB_ARGUMENTS"  # a launched job's gdlab-sweep arguments
SWEEP_CHOICE = re.compile(r"^\+{0,2}sweep=")


@dataclass
class GdlabSweeperConf:
    _target_: str = TARGET
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler: the Optuna sweeper plugin's sampler configs
    direction: Any = "minimize"
    storage: Any = None
    study_name: str | None = None
    n_trials: int = 20  # the study's budget of finished trials, across invocations (gdlab-sweep's --budget)
    n_jobs: int = 1  # with a process launcher: jobs one launch starts (each trains whole population batches)
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None
    custom_search_space: str | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="gdlab", node=GdlabSweeperConf, provider="gdlab")


class GdlabSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def sweep(self, arguments: list[str]) -> None:
        from gdlab.sweep.cli import main as gdlab_sweep
        from gdlab.sweep.spec import SweepError

        try:
            argv = engine_arguments(self.config, arguments)
        except SweepError as error:
            print(f"gdlab-train: error: {error}", file=sys.stderr)
            sys.exit(2)
        jobs = None
        if self.config.hydra.runtime.choices.get("hydra/launcher") not in IN_PROCESS_LAUNCHERS:
            jobs = HydraJobs(self.hydra_context, self.config, arguments)
        with hydra_released():
            status = gdlab_sweep(argv, jobs)
        if status:
            sys.exit(status)


class HydraJobs:
    """gdlab.sweep.jobs.JobLauncher through this multirun's Hydra launcher: every job runs `launched_job`,
    with the task's overrides (what Hydra prints and saves for it)."""

    def __init__(self, hydra_context, config: DictConfig, overrides: list[str]) -> None:
        from hydra.core.plugins import Plugins

        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=launched_job, config=config
        )
        self.overrides, self.launched = list(overrides), 0
        self.jobs_at_once = int(config.hydra.sweeper.n_jobs)

    def launch(self, arguments: list[str], environment: dict[str, str], count: int) -> list[int]:
        from hydra.core.utils import JobStatus

        os.environ.update({**environment, JOB_ARGUMENTS_ENV: json.dumps(arguments)})  # jobs inherit it
        with hydra_restored():
            returns = self.launcher.launch([self.overrides] * count, initial_job_idx=self.launched)
        self.launched += count
        return [r.return_value if r.status == JobStatus.COMPLETED else 1 for r in returns]

    def stop(self) -> None:
        from gdlab.sweep.jobs import stop_local_jobs

        stop_local_jobs()


def launched_job(cfg: DictConfig) -> int:
    """One job of a process launcher: a gdlab-sweep worker, its index after Hydra's job number."""
    from hydra.core.hydra_config import HydraConfig

    from gdlab.sweep.cli import main as gdlab_sweep

    index = HydraConfig.get().job.num + 1  # 0 is the invocation's own stream
    with hydra_released():
        return gdlab_sweep([*json.loads(os.environ[JOB_ARGUMENTS_ENV]), "--worker-index", str(index)])


SET_ASIDE: list = []  # the multirun's Hydra while the engine runs (hydra_released), for its launches


@contextlib.contextmanager
def hydra_released():
    """The engine composes trial configs with Hydra's compose API, which needs Hydra's global state free:
    this multirun's is set aside meanwhile and put back for Hydra's own end of the multirun."""
    from hydra.core.global_hydra import GlobalHydra

    SET_ASIDE.append(GlobalHydra.instance().hydra)
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        hydra = SET_ASIDE.pop()
        if hydra is not None:
            GlobalHydra.instance().initialize(hydra)


@contextlib.contextmanager
def hydra_restored():
    """The multirun's Hydra back for a launch (a launcher hands Hydra's state to its jobs)."""
    with hydra_released():
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().initialize(SET_ASIDE[-2])
        yield


def engine_arguments(config: DictConfig, arguments: list[str]) -> list[str]:
    """gdlab-sweep's command line for this multirun: the sweep's name, the task's overrides, and the
    `hydra.sweeper.*` overrides (Hydra keeps them out of the task's), refused where this sweeper cannot
    honour them (one line, before any work)."""
    from gdlab.sweep.spec import SweepError

    choices = config.hydra.runtime.choices
    name = choices.get("sweep")
    if not name:
        raise SweepError(
            "hydra/sweeper=gdlab runs a sweep file: add +sweep=NAME (gdlab-sweep --help lists them)"
        )
    launcher = choices.get("hydra/launcher")
    if launcher not in IN_PROCESS_LAUNCHERS:
        check_no_password_on_disk(config, launcher)
        n_jobs = config.hydra.sweeper.n_jobs
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise SweepError(f"hydra.sweeper.n_jobs={n_jobs} is not allowed with hydra/launcher={launcher}; "
                             "use an integer >= 1 (the jobs one launch starts)")  # fmt: skip
    task = [argument for argument in arguments if not SWEEP_CHOICE.match(argument)]
    sweeper = [
        o for o in OmegaConf.to_container(config.hydra.overrides.hydra) if o.startswith("hydra.sweeper.")
    ]
    return [name, *task, *sweeper]


def check_no_password_on_disk(config: DictConfig, launcher: str) -> None:
    """A process launcher writes the multirun's config to disk for its jobs (submitit pickles it): a URL
    there must not hold a password; the environment carries it instead."""
    from gdlab.masking import mask_passwords
    from gdlab.sweep.spec import SweepError

    for key in ("tracking.uri", "hydra.sweeper.storage"):
        url = OmegaConf.select(config, key, default=None)
        if isinstance(url, str) and mask_passwords(url) != url:
            raise SweepError(f"{key} holds a password, which hydra/launcher={launcher} would write to disk "
                             "with each job's config; give it through the environment instead "
                             "(MLFLOW_TRACKING_PASSWORD for tracking.uri, PGPASSWORD or ~/.pgpass for a "
                             "PostgreSQL storage)")  # fmt: skip
