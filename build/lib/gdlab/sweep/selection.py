"""What a sweep selects on, and what it may report: choose on validation, measure the test split once.

A sweep ranks its trials by `objective`. Ranking on a test metric makes the reported test score the best
of many looks at the same rows, an optimistic estimate (Cawley & Talbot, JMLR 2010), so a sweep whose
objective is a test metric is refused unless its file says `gdlab_sweep.select_on_test: true`. Sweeps
on the training loss (fitting studies, such as XOR) select on what they report and stay as they are.

Light on purpose (no Optuna, torch or Lightning): Hydra's callback (gdlab.sweep.parent_run) imports it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from gdlab.config import TEST_METRICS, ConfigError


def select_on_test(task: DictConfig) -> bool:
    return _flag(task, "select_on_test", default=False)


def refit_enabled(task: DictConfig) -> bool:
    return _flag(task, "refit", default=True)


def _flag(task: DictConfig, key: str, default: bool) -> bool:
    value = OmegaConf.select(task, f"gdlab_sweep.{key}", default=default)
    if not isinstance(value, bool):
        raise ConfigError(f"gdlab_sweep.{key}={value!r} is not allowed; choose one of true|false")
    return value


def selected_on(task: DictConfig) -> str:
    """The split a sweep ranks its trials on: train, val or test."""
    return str(task.objective).split("/", 1)[0]


def check_selection(task: DictConfig) -> None:
    """Refuse a sweep that would select on the test split, unless it opts in knowingly."""
    if task.objective in TEST_METRICS and not select_on_test(task):
        metric = task.objective.split("/", 1)[1]
        raise ConfigError(
            f"objective={task.objective} selects on the test split, so the sweep's test score would be "
            f"optimistically biased; use objective=val/{metric} with dataset.val_size (e.g. 0.2): the test "
            "split then measures the chosen configuration once; or opt in knowingly with "
            "++gdlab_sweep.select_on_test=true"
        )
