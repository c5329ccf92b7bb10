"""Entry points: `gdlab-train` (a Hydra app) and `gdlab.run([...])` for notebooks.

conf -> validate -> build (data, model, optimizer) -> fit (Lightning) -> final metrics -> objective.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned
from pytorch_lightning.utilities.exceptions import SIGTERMException

from gdlab.artifacts import write_history, write_run_outputs
from gdlab.config import ConfigError, validate
from gdlab.data import N_CLASSES, Dataset, load_dataset, make_loader
from gdlab.masking import mask_passwords
from gdlab.model import MLP, encode_targets, initialize, layer_sizes
from gdlab.module import GDLabModule
from gdlab.population import PopulationMLP, PopulationModule, check_population, group_by_architecture
from gdlab.tracking import (
    MlflowRun,
    TrackingUnavailable,
    mask_saved_hydra_configs,
    masked_config,
    run_name,
    tracking_uri,
)

log = logging.getLogger("gdlab")
# Hydra 1.4 warns on every instantiate without an execution whitelist, including the ones it makes itself
# from gdlab's own config (our sweep callback, the sweeper's Optuna sampler): those targets are ours.
warnings.filterwarnings(
    "ignore",
    message=r"hydra\.utils\.instantiate\(\) resolved _target_='(gdlab|optuna)\.",
    category=UserWarning,
)
CONFIG_MODULE = "gdlab.conf"
MISSING_KEY = object()
DTYPES = {32: torch.float32, 64: torch.float64}
LIGHTNING_PRECISION = {32: "32-true", 64: "64-true"}


@dataclass
class RunResult:
    history: pd.DataFrame  # one row per epoch, one column per logged value
    final: dict  # final metrics (at the trained weights), evaluation counts, wall time, objective
    model: MLP
    config: DictConfig
    data: Dataset = field(repr=False)


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The composed config of `overrides`, as `gdlab-train` would see it (not yet validated)."""
    with initialize_config_module(CONFIG_MODULE):
        return compose(config_name, overrides=list(overrides or []))


def run(overrides: list[str] | None = None, output_dir: str | Path | None = None,
        population: list | None = None) -> RunResult | list[RunResult]:  # fmt: skip
    """Train one run from CLI-style overrides, e.g. ``run(["dataset=xor", "optimizer.lr=0.5"])``.

    With `population`, a list of per-member overrides (dicts like ``{"optimizer.lr": 0.1}`` or lists
    of "key=value"), train one run per member on top of `overrides`: those sharing an architecture
    together as one batched model (gdlab.population). Returns one RunResult per member, in order;
    with `output_dir`, member i writes to <output_dir>/member-i.
    """
    overrides = list(overrides or [])
    if population is None:
        return fit(validate(compose_config(overrides)), overrides, output_dir)
    members = [[*overrides, *member_overrides(m)] for m in population]
    compose = VariantComposer(overrides)
    cfgs = [compose(member_overrides(m)) for m in population]
    output_dirs = [Path(output_dir) / f"member-{i}" for i in range(len(cfgs))] if output_dir else None
    results: list = [None] * len(cfgs)
    groups = group_by_architecture(cfgs)
    for group in groups:  # every population is checked before any trains
        check_population([cfgs[i] for i in group])
    for group in groups:
        trained = fit_population(
            [cfgs[i] for i in group],
            [members[i] for i in group],
            [output_dirs[i] for i in group] if output_dirs else None,
        )
        for i, result in zip(group, trained, strict=True):
            results[i] = result
    return results


def member_overrides(member: dict | list | tuple) -> list[str]:
    if isinstance(member, dict):
        return [f"{key}={value}" for key, value in member.items()]
    return list(member)


class VariantComposer:
    """Validated configs of `overrides` + a variant's overrides, as compose_config would make them.

    Hydra composes once per distinct set of config-group choices (a compose costs ~70 ms, as much
    as training a small run); a plain value such as optimizer.lr=0.1 is set on a copy.
    """

    def __init__(self, overrides: list[str]):
        self.overrides = list(overrides)
        self.parser = OverridesParser.create()
        self.composed = {(): compose_config(self.overrides)}

    def __call__(self, variant: list[str]) -> DictConfig:
        base, to_compose, values = self.composed[()], [], {}
        for text, override in zip(variant, self.parser.parse_overrides(variant), strict=True):
            current = OmegaConf.select(base, override.key_or_group, default=MISSING_KEY)
            plain = not (override.is_add() or override.is_delete() or override.is_sweep_override())
            if plain and isinstance(current, int | float | str | bool):
                values[override.key_or_group] = override.value()
            else:  # a config group, a new or deleted key, a list or dict value: Hydra composes it
                to_compose.append(text)
        key = tuple(to_compose)
        if key not in self.composed:
            self.composed[key] = compose_config([*self.overrides, *to_compose])
        cfg = copy.deepcopy(self.composed[key])
        for name, value in values.items():
            OmegaConf.update(cfg, name, value, merge=False)
        return validate(cfg)


def build(cfg: DictConfig) -> tuple[Dataset, MLP]:
    data = load_data(cfg)
    return data, init_model(cfg, data)


def load_data(cfg: DictConfig) -> Dataset:
    head, n_classes = cfg.model.head, N_CLASSES[cfg.dataset.name]
    encode = lambda y, dtype: encode_targets(y, head, n_classes, dtype)  # noqa: E731
    return load_dataset(cfg.dataset, encode, DTYPES[cfg.trainer.precision])


def init_model(cfg: DictConfig, data: Dataset) -> MLP:
    """The model drawn from cfg.seed: the same weights whether it trains alone or in a population."""
    pl.seed_everything(cfg.seed, verbose=False)
    n_outputs = 1 if cfg.model.head == "sigmoid" else data.n_classes
    sizes = layer_sizes(data.n_features, cfg.model.depth, cfg.model.width, n_outputs)
    model = MLP(sizes, cfg.model.activation, cfg.model.head, cfg.loss)
    initialize(model, cfg.init.name, cfg.init.get("std"))
    return model.to(DTYPES[cfg.trainer.precision])


def make_trainer(cfg: DictConfig) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=LIGHTNING_PRECISION[cfg.trainer.precision],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def fit(
    cfg: DictConfig,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    epoch_callbacks: list | tuple = (),
    tags: dict | None = None,
) -> RunResult:
    """Train a validated config, measure the result, and track it (tracking.backend != none).

    The tracking run is created before training, so an unreachable backend stops the run before
    any work. Whatever happens later (an exception, Ctrl-C, SIGTERM, divergence, a tracking outage),
    the history and artifacts are written to `output_dir` and the MLflow run is closed with the
    matching status. `epoch_callbacks` see every history row (a sweep reports to Optuna there and
    may raise `optuna.TrialPruned`); `tags` are added to the MLflow run.
    """
    overrides = list(overrides or [])
    data, model = build(cfg)
    module = GDLabModule(model, cfg.optimizer, cfg.backprop, data.test, cfg.trainer.stop_loss,
                         cfg.trainer.get("max_evals"))  # fmt: skip
    loader = make_loader(data.train, cfg.optimizer.get("batch_size"), cfg.seed)
    with quiet_lightning():
        trainer = make_trainer(cfg)
    run = None
    if tracking_uri(cfg) is not None:
        run = MlflowRun(cfg, overrides, device=str(trainer.strategy.root_device), extra_tags=tags)
        module.epoch_callbacks.append(run.log_epoch)
    module.epoch_callbacks.extend(epoch_callbacks)
    output_dir = Path(output_dir) if output_dir else default_output_dir(cfg, run)
    status, started = "FAILED", time.perf_counter()
    try:
        with quiet_lightning(), torch_threads(cfg.trainer.get("threads")):
            trainer.fit(module, train_dataloaders=loader)
        status = "FAILED" if module.diverged_at is not None else "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        status = "KILLED"
        raise
    except TrialPruned:
        status = "KILLED"
        if run is not None:
            run.set_tags({"optuna.state": "PRUNED", "failure.reason": "pruned by the sweep's pruner"})
        raise
    finally:
        result = collect_result(cfg, module, data, time.perf_counter() - started)
        if output_dir is not None:
            save_outputs(result, overrides, output_dir, run, status)
    return result


def fit_population(
    cfgs: list[DictConfig],
    overrides: list[list[str]] | None = None,
    output_dirs: list | None = None,
    epoch_callbacks: list[list] | None = None,
    tags: list[dict | None] | None = None,
) -> list[RunResult]:
    """Train validated configs that share an architecture as one batched model (gdlab.population).

    Each member is what `fit` would make of its config: its own history, final metrics, output
    directory and MLflow run, with its own epoch callbacks (a TrialPruned there retires that member
    only). `wall_time` is the population's. Returns one RunResult per config, in order.
    """
    check_population(cfgs)
    n, first = len(cfgs), cfgs[0]
    overrides = overrides or [[] for _ in cfgs]
    epoch_callbacks = epoch_callbacks or [[] for _ in cfgs]
    tags = tags or [None] * n
    data = load_data(first)
    module = PopulationModule(PopulationMLP([init_model(cfg, data) for cfg in cfgs]), cfgs, data.test)
    loader = make_loader(data.train, first.optimizer.get("batch_size"), first.seed)
    with quiet_lightning():
        trainer = make_trainer(first)
    runs: list[MlflowRun | None] = [None] * n
    if tracking_uri(first) is not None:
        device = str(trainer.strategy.root_device)
        runs = [
            MlflowRun(cfg, o, device=device, extra_tags=t)
            for cfg, o, t in zip(cfgs, overrides, tags, strict=True)
        ]
    for p in range(n):
        module.member_callbacks[p] = [*([runs[p].log_epoch] if runs[p] else []), *epoch_callbacks[p]]
    interrupted, started, results = True, time.perf_counter(), []
    try:
        with quiet_lightning(), torch_threads(first.trainer.get("threads")):
            trainer.fit(module, train_dataloaders=loader)
        interrupted = False
    finally:
        wall_time = time.perf_counter() - started
        for p, cfg in enumerate(cfgs):
            result = collect_result(cfg, module.member_view(p), data, wall_time)
            result.final["pruned"] = module.pruned[p]
            if interrupted or module.pruned[p]:
                status = "KILLED"
            else:
                status = "FAILED" if result.final["diverged_at"] is not None else "FINISHED"
            if module.pruned[p] and runs[p] is not None:
                runs[p].set_tags({"optuna.state": "PRUNED", "failure.reason": module.pruned[p]})
            output_dir = Path(output_dirs[p]) if output_dirs else default_output_dir(cfg, runs[p])
            if output_dir is not None:
                save_outputs(result, overrides[p], output_dir, runs[p], status)
            results.append(result)
    return results


def collect_result(cfg: DictConfig, module: GDLabModule, data: Dataset, wall_time: float) -> RunResult:
    model = module.model.cpu()
    final = final_metrics(model, data)
    final.update(
        epochs=len(module.history),
        evals_fwd=module.evals["fwd"],
        evals_fwdbwd=module.evals["fwdbwd"],
        evals=module.evals["fwd"] + module.evals["fwdbwd"],
        ls_failures=module.ls_failures,
        wall_time=wall_time,
        diverged_at=module.diverged_at,
    )
    final["objective"] = math.nan if module.diverged_at is not None else final[cfg.objective]
    return RunResult(pd.DataFrame(module.history), final, model, cfg, data)


def default_output_dir(cfg: DictConfig, run: MlflowRun | None) -> Path | None:
    """Hydra's job directory under gdlab-train; for a tracked gdlab.run, <tracking.dir>/outputs/<run>."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    if run is None:
        return None
    return Path(cfg.tracking.dir).resolve() / "outputs" / f"{run_name(cfg)}-{run.run_id[:8]}"


def save_outputs(result: RunResult, overrides: list[str], output_dir: Path, run: MlflowRun | None,
                 status: str) -> None:  # fmt: skip
    """History first (it is what an outage or a crash must not lose), then plots, then MLflow."""
    result.final["output_dir"] = str(output_dir)
    write_history(output_dir, result.history)
    cfg = masked_config(result.config)
    try:
        masked_overrides = [mask_passwords(o) for o in overrides]
        write_run_outputs(output_dir, cfg, masked_overrides, result.history, result.model, result.data,
                          plots=cfg.tracking.get("plots", True))  # fmt: skip
    except Exception as error:  # a plot must never cost the run its history or its MLflow status
        log.warning("gdlab: could not write every artifact to %s: %s", output_dir, error)
    if run is None:
        return
    if result.final["diverged_at"] is not None:
        run.set_tags({"failure.reason": "loss became NaN/inf", "failure.epoch": result.final["diverged_at"]})
    run.log_final(result.final)
    run.log_artifacts(output_dir)
    run.end(status)
    result.final.update(
        mlflow_run_id=run.run_id, tracking_outage=run.outage, tracking_uri=mask_passwords(run.uri)
    )
    if run.outage:
        log.warning(
            "gdlab: the tracking backend failed during the run (%s); the full history is in %s",
            run.outage,
            output_dir / "history.csv",
        )


@torch.no_grad()
def final_metrics(model: MLP, data: Dataset) -> dict:
    final = {}
    for name, split in (("train", data.train), ("test", data.test)):
        if split is None:
            continue
        Z = model(split.X)
        final[f"{name}/loss"] = float(model.loss(Z, split.T))
        final[f"{name}/acc"] = float(model.accuracy(Z, split.T))
    return final


@contextmanager
def torch_threads(n: int | None):
    """torch's CPU thread count for a block (None: leave it), restored afterwards for the caller."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class quiet_lightning:
    """Silence Lightning's banner lines and its warnings about our deliberate choices."""

    NAMES = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")

    def __enter__(self):
        self._levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)


def summary(result: RunResult) -> str:
    f, cfg = result.final, result.config
    parts = [f"{k}={f[k]:.6g}" for k in ("train/loss", "train/acc", "test/loss", "test/acc") if k in f]
    lines = [
        f"gdlab: {cfg.dataset.name} {cfg.optimizer.name} lr={cfg.optimizer.lr} depth={cfg.model.depth} "
        f"backprop={cfg.backprop} seed={cfg.seed}",
        "final: " + " ".join(parts),
        f"epochs={f['epochs']} evals={f['evals']} (forward {f['evals_fwd']}, forward+backward "
        f"{f['evals_fwdbwd']}) line_search_failures={f['ls_failures']} wall_time={f['wall_time']:.2f}s",
    ]
    if f.get("mlflow_run_id"):
        experiment = cfg.tracking.experiment or cfg.dataset.name
        lines.append(f"mlflow run {f['mlflow_run_id']} in experiment '{experiment}' at {f['tracking_uri']}")
    if f.get("tracking_outage"):
        lines.append(f"tracking outage: {f['tracking_outage']}; full history kept in {f['output_dir']}")
    if f["diverged_at"] is not None:
        lines.append(f"diverged: loss became NaN/inf at epoch {f['diverged_at']}; objective is NaN")
    lines.append(f"objective {cfg.objective} ({cfg.direction}) = {f['objective']:.6g}")
    return "\n".join(lines)


@hydra.main(config_path="pkg://gdlab.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        mask_saved_hydra_configs(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    try:
        cfg = validate(cfg)
    except ConfigError as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    overrides = list(hydra_cfg.overrides.task)
    try:
        result = fit(cfg, overrides)
    except TrackingUnavailable as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(3)
    except SIGTERMException:  # Lightning's: raised at the end of the epoch that received SIGTERM
        print(
            f"gdlab-train: stopped by SIGTERM; partial history in {hydra_cfg.runtime.output_dir}",
            file=sys.stderr,
        )
        sys.exit(143)
    print(summary(result), flush=True)
    return result.final["objective"]


if __name__ == "__main__":
    main()
