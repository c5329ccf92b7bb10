"""`hydra/sweeper=gdlab`: `gdlab-train -m +sweep=NAME hydra/sweeper=gdlab ...` runs the sweep with the engine
behind `gdlab-sweep NAME ...` (gdlab.sweep.cli): Optuna's ask and tell with the sweep's sampler and pruner,
population batches, replicates and folds, PBT, the budget across invocations, heartbeats, signals, one MLflow
parent run with the trials as children, the refit and the report. The trials train in this process; the
sweep file's `hydra.sweeper` settings (and any `hydra.sweeper.*` given on the command line) are read as
gdlab-sweep reads them.

Hydra finds this plugin by its entry point (group `hydra.plugins`, pyproject.toml), which works in editable
installs too; importing it stores its config as `hydra/sweeper=gdlab`. The config has the Optuna sweeper's
fields, so every shipped sweep file composes with either sweeper.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING, DictConfig, OmegaConf

TARGET = "gdlab.sweep.hydra_sweeper.GdlabSweeper"
IN_PROCESS_LAUNCHERS = ("basic",)  # the engine trains its batches itself
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
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None
    custom_search_space: str | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="gdlab", node=GdlabSweeperConf, provider="gdlab")


class GdlabSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config

    def sweep(self, arguments: list[str]) -> None:
        from gdlab.sweep.cli import main as gdlab_sweep
        from gdlab.sweep.spec import SweepError

        try:
            argv = engine_arguments(self.config, arguments)
        except SweepError as error:
            print(f"gdlab-train: error: {error}", file=sys.stderr)
            sys.exit(2)
        with hydra_released():
            status = gdlab_sweep(argv)
        if status:
            sys.exit(status)


@contextlib.contextmanager
def hydra_released():
    """The engine composes trial configs with Hydra's compose API, which needs Hydra's global state free:
    this multirun's is set aside meanwhile and put back for Hydra's own end of the multirun."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        if hydra is not None:
            GlobalHydra.instance().initialize(hydra)


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
        raise SweepError(f"hydra/launcher={launcher} is not allowed with hydra/sweeper=gdlab, which trains "
                         "its batches in this process; use hydra/launcher=basic (or gdlab-sweep "
                         f"{name} --workers K for several processes, or hydra/sweeper=optuna)")  # fmt: skip
    task = [argument for argument in arguments if not SWEEP_CHOICE.match(argument)]
    sweeper = [
        o for o in OmegaConf.to_container(config.hydra.overrides.hydra) if o.startswith("hydra.sweeper.")
    ]
    return [name, *task, *sweeper]
