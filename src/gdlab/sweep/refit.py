"""The sweep's result: the chosen configuration refit on the training and validation rows together, and
its test split measured once.

Trials are ranked on the validation split (gdlab.sweep.selection). The winner's configuration (its
trainer budget, its seed; a PBT winner's replayed schedule) then trains once more with
`dataset.val_size=0` (and no folds): the test rows are the same rows (they are split off first), and
the rows that were validation rows now train too. That run, tagged gdlab.role=refit, is a child of the
sweep's parent run, and its test metrics are the sweep's result. Without a refit (`--no-refit`,
`gdlab_sweep.refit: false`, or a sweep that does not select on validation) the best trial's own test
metrics are reported, and labelled as such.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gdlab.config import TEST_METRICS, validate
from gdlab.masking import error_line
from gdlab.tracking import PARENT_ENV, REFIT_ROLE, ROLE_TAG, run_name

REFIT_OVERRIDE = "dataset.val_size=0"


@dataclass
class SweepResult:
    """What a sweep reports as its answer: test metrics, and where they were measured."""

    metrics: dict[str, float]  # test/loss, test/acc
    trial: str  # the chosen trial, as a person reads it: "trial #12"
    refit: bool  # True: measured by the refit on train + val; False: the best trial's own test metrics
    selected_on: str  # train, val or test: the split the trials were ranked on
    train_rows: int | None = None  # the rows the measured model trained on
    test_rows: int | None = None
    run_id: str | None = None  # the MLflow run that measured them (the refit, or the best trial)
    model: str | None = None  # the chosen network as an MLflow model (the refit's): its URI, registration

    def line(self) -> str:
        """The sweep's last line: the test metrics and how they were obtained."""
        values = " ".join(f"{key}={value:.6g}" for key, value in self.metrics.items())
        rows = f" on {self.test_rows} test rows" if self.test_rows else ""
        if self.refit:
            return (f"result: {values}, measured once{rows} that no trial trained on or was ranked by, "
                    f"by the refit of {self.trial} (selected on {self.selected_on}) on {self.train_rows} "
                    "train + val rows")  # fmt: skip
        how = "selected on the test split itself: optimistic" if self.selected_on == "test" else (
            f"selected on {self.selected_on}, not refit")  # fmt: skip
        return f"result: {values}, the best trial's own ({self.trial}, {how})"

    def label(self) -> str:
        """How figures and report.md title the result."""
        values = ", ".join(f"{key} {value:.4g}" for key, value in self.metrics.items())
        if self.refit:
            return f"result: {values} (refit of {self.trial} on train+val, test measured once)"
        return f"result: {values} ({self.trial}'s own; selected on {self.selected_on}, not refit)"


def train_objective(cfg: DictConfig) -> str:
    """The refit's objective: the trial's metric on the training rows (it has no validation split)."""
    return f"train/{cfg.objective.split('/', 1)[1]}"


def refit_config(cfg: DictConfig) -> DictConfig:
    """A trial's validated config, to train on train + val: no validation split, a train objective."""
    refit = OmegaConf.create(OmegaConf.to_container(cfg))
    refit.dataset.val_size = 0.0
    if refit.dataset.get("cv_folds"):  # the folds were the validation rows: all of them train now
        refit.dataset.cv_folds, refit.dataset.cv_fold = None, 0
    refit.objective = train_objective(cfg)
    return validate(refit)


def refit_overrides(overrides: list[str], cfg: DictConfig) -> list[str]:
    """The overrides that reproduce the refit: the trial's, then no validation split and a train objective."""
    folds = ["dataset.cv_folds=null", "dataset.cv_fold=0"] if cfg.dataset.get("cv_folds") else []
    return [*overrides, REFIT_OVERRIDE, *folds, f"objective={train_objective(cfg)}"]


def refit(cfg: DictConfig, overrides: list[str], output_dir: Path, trial: str,
          parent_run_id: str | None, register: str | None = None) -> SweepResult:  # fmt: skip
    """Train the chosen trial's config (validated) on train + val, as a child of `parent_run_id`; its run
    holds the chosen network as an MLflow model, registered as a new version of `register` if given."""
    from gdlab.fit import fit

    refit_cfg = refit_config(cfg)
    refit_cfg.tracking.log_model, refit_cfg.tracking.registered_model = True, register
    refit_cfg.tracking.system_metrics = False  # the sweep's parent run has them
    name = f"refit {trial.replace('trial ', '')} {run_name(refit_cfg)}"  # refit #12 moons-gd-...
    tags = {ROLE_TAG: REFIT_ROLE, "mlflow.runName": name}
    with parent_run(parent_run_id):
        result = fit(refit_cfg, refit_overrides(overrides, cfg), output_dir, tags=tags)
    metrics = {key: result.final[key] for key in TEST_METRICS if key in result.final}
    final = result.final
    model = final.get("model_uri") and (final["model_uri"] + (
        f" (registered: {final['registered_model']})" if final.get("registered_model") else ""))  # fmt: skip
    return SweepResult(metrics, trial, True, cfg.objective.split("/", 1)[0], len(result.data.train),
                       len(result.data.test) if result.data.test is not None else None,
                       final.get("mlflow_run_id"), model)  # fmt: skip


@contextlib.contextmanager
def parent_run(parent_run_id: str | None) -> Iterator[None]:
    """The refit's MLflow run is a child of the sweep's parent run (gdlab.tracking reads PARENT_ENV)."""
    before = os.environ.get(PARENT_ENV)
    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before


def wants_refit(cfg: DictConfig) -> bool:
    """A refit measures something new only where trials were ranked on a validation split."""
    return cfg.objective.startswith("val/") and cfg.dataset.test_size > 0


def trained_step(uri: str, run_id: str, final: dict) -> int | None:
    """The step of a trial's trained weights, where its run's final/<metric> are (MLflow links that step's
    metrics to a model logged at it): the trial's epochs, noted on it; a study from before they were noted,
    its run's final/objective's step; None where neither is known."""
    from gdlab.writer_client import WriterClient

    if "epochs" in final:
        return int(final["epochs"])
    history = WriterClient(uri).get_metric_history(run_id, "final/objective")
    return max((metric.step for metric in history), default=None)


def best_trial_model(cfg: DictConfig, run_id: str | None, weights: Path, final: dict,
                     register: str | None) -> str | None:  # fmt: skip
    """Without a refit, the chosen model is the best trial's own network: read back from its weights.pt
    (a trial of one member trained on this machine) and logged on its run at its trained step (`final`:
    the trial's noted final values). What it could not, in one line."""
    import torch

    from gdlab.fit import build
    from gdlab.logged_model import log_model
    from gdlab.model_logger import ModelLogger
    from gdlab.tracking import tracking_uri

    if run_id is None or not weights.is_file():
        print(f"gdlab-sweep: no model logged: {weights} is not here (a trial of several members, or trained "
              "elsewhere); a refit logs one")  # fmt: skip
        return None
    try:
        step = trained_step(tracking_uri(cfg), run_id, final)
        if step is None:  # MLflow would link step 0's metrics, the untrained network's
            print(f"gdlab-sweep: no model logged: run {run_id} holds no final/objective to link it to")
            return None
        data, model = build(cfg)
        model.load_state_dict(torch.load(weights, weights_only=True))
        logger = ModelLogger.running()  # the sweep's child: no MLflow in this process (gdlab.model_logger)
        log = log_model if logger is None else logger.log
        uri, version = log(tracking_uri(cfg), run_id, model, data.train.X.numpy(), step, register)
    except Exception as error:  # the sweep's answer stands without it
        print(f"gdlab-sweep: no model logged: {error_line(error)}")
        return None
    return uri + (f" (registered: {register} version {version})" if version else "")
