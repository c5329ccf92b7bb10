"""The fit lifecycle, once for every run: build → fit → record → outputs → tracking status.

`fit_population` trains validated configs that share an architecture as one stacked model
(`gdlab.module.TrainingModule`); `fit` is a population of one. Each member gets what a run alone
gets: its own history, final metrics, output directory and MLflow run, closed FINISHED, FAILED
(diverged, or an exception) or KILLED (Ctrl-C, SIGTERM); a member an epoch callback retired (a sweep's
pruner) is FINISHED with tag optuna.state=PRUNED.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gdlab.artifacts import HistoryFiles, write_history, write_run_outputs
from gdlab.data import N_CLASSES, Dataset, load_dataset, load_folds, make_loader
from gdlab.interrupts import interruption_reason
from gdlab.masking import mask_passwords, masked_config_yaml
from gdlab.model import MLP, draw_layer, encode_targets, initialize, layer_sizes
from gdlab.module import EpochTable, GroupCallback, PopulationOutcome, Stops, TrainingModule
from gdlab.optimizers import GD, Adam, Backtracking, LBFGSStep, MemberOptimizer, member_tensor
from gdlab.pbt import PopulationBasedTraining
from gdlab.population import Population, check_population
from gdlab.progress import Progress
from gdlab.run_epochs import RunEpochs
from gdlab.schedules import schedules_of
from gdlab.step_rules import BarzilaiBorwein, NonMonotone, Polyak
from gdlab.tracking import MlflowRun, run_name, tracking_uri

log = logging.getLogger("gdlab")
DTYPES = {32: torch.float32, 64: torch.float64}
LIGHTNING_PRECISION = {32: "32-true", 64: "64-true"}
BACKTRACKING_NUMBERS = ("lr", "c", "beta", "growth", "lr_max", "lr_min", "max_backtracks", "tiny_step")


class RunResult:
    """One run's (or population member's) result.

    history: one row per epoch, one column per logged value; final: final metrics (at the trained
    weights), evaluation counts, wall time, objective; model: the trained network; config: its config;
    ended_at: wall-clock time its training ended (a population member's own end). A population member's
    `history`, `model` and `config` are made when first read: thousands of members cost nothing until then.
    """

    def __init__(
        self, history: pd.DataFrame, final: dict, model, config, data: Dataset, ended_at: float = 0.0
    ):
        self.final, self.data, self.ended_at = final, data, ended_at
        self._history, self._model, self._config = history, model, config

    @property
    def history(self) -> pd.DataFrame:
        if isinstance(self._history, Later):
            self._history = self._history()
        return self._history

    @property
    def model(self) -> MLP:
        if isinstance(self._model, Later):
            self._model = self._model()
        return self._model

    @property
    def config(self) -> DictConfig:
        if isinstance(self._config, Later):
            self._config = self._config()
        return self._config

    def __repr__(self) -> str:
        return f"RunResult(final={self.final!r})"


class Later(functools.partial):
    """A value made on first use (see RunResult)."""


def load_data(cfg: DictConfig) -> Dataset:
    head, n_classes = cfg.model.head, N_CLASSES[cfg.dataset.name]
    encode = lambda y, dtype: encode_targets(y, head, n_classes, dtype)  # noqa: E731
    return load_dataset(cfg.dataset, encode, DTYPES[cfg.trainer.precision])


def load_population_data(population: Population) -> Dataset:
    """The population's data: its shared config's, or, where members validate on different folds, one
    dataset with each member's own rows (gdlab.data.load_folds)."""
    folds = population.folds()
    if folds is None:  # one fold for all (member 0's: a mini-batch population is one fold's)
        return load_data(population.view(0))
    cfg = population.shared
    head, n_classes = cfg.model.head, N_CLASSES[cfg.dataset.name]
    encode = lambda y, dtype: encode_targets(y, head, n_classes, dtype)  # noqa: E731
    return load_folds(cfg.dataset, folds, encode, DTYPES[cfg.trainer.precision])


def model_sizes(cfg: DictConfig, data: Dataset) -> list[int]:
    n_outputs = 1 if cfg.model.head == "sigmoid" else data.n_classes
    return layer_sizes(data.n_features, cfg.model.depth, cfg.model.width, n_outputs)


def init_model(cfg: DictConfig, data: Dataset) -> MLP:
    """The model drawn from cfg.seed: the same weights whether it trains alone or in a population."""
    pl.seed_everything(cfg.seed, verbose=False)
    model = MLP(model_sizes(cfg, data), cfg.model.activation, cfg.model.head, cfg.loss)
    initialize(model, cfg.init.name, cfg.init.get("std"))
    return model.to(DTYPES[cfg.trainer.precision])


def init_population(population: Population, data: Dataset) -> MLP:
    """The stacked model, member p drawn from its own seed exactly as `init_model` draws it alone (torch's
    generator seeded, then the layers in order), straight into the stacked weights."""
    if len(population) == 1:
        return MLP.stack([init_model(population.view(0), data)])
    cfg = population.shared
    model = MLP(
        model_sizes(cfg, data), cfg.model.activation, cfg.model.head, cfg.loss, population=len(population)
    )
    model.to(DTYPES[cfg.trainer.precision])
    with torch.no_grad():
        for p, (seed, init) in enumerate(
            zip(population.values("seed"), population.values("init"), strict=True)
        ):
            torch.manual_seed(seed)  # what pl.seed_everything does for torch
            for W, b in model.layers:
                W_p, b_p = draw_layer(W.shape[1], W.shape[2], init["name"], init.get("std"))
                W[p] = W_p
                b[p, 0] = b_p
    return model


def build(cfg: DictConfig) -> tuple[Dataset, MLP]:
    data = load_data(cfg)
    return data, init_model(cfg, data)


def optimizer_factory(population: Population):
    """params -> the members' optimizer, with each member's numbers from its own config, on the params'
    device."""
    first = population.shared.optimizer

    def make(params):
        device = params[0].device

        def numbers(key: str, default=None) -> torch.Tensor:
            return member_tensor(population.values(f"optimizer.{key}", default), device)

        return build_optimizer(params, first, numbers)

    return make


def build_optimizer(params, first, numbers) -> MemberOptimizer:
    name = first.name
    if name == "lbfgs":
        return LBFGSStep(params, first.lr, first.max_iter, first.history_size)
    if name == "adam":
        return Adam(params, numbers("lr"))
    if name == "polyak":
        return Polyak(params, numbers("f_star"), numbers("c"), numbers("step_max"))
    if name == "bb":
        return BarzilaiBorwein(params, numbers("lr"), numbers("step_min"), numbers("step_max"), first.variant)
    if name in ("backtracking", "nonmonotone"):
        kwargs = {key: numbers(key) for key in BACKTRACKING_NUMBERS}
        kwargs.update(reset=first.reset, on_failure=first.on_failure, trial_eval=first.trial_eval)
        if name == "nonmonotone":
            return NonMonotone(params, first.memory, first.first_trial, numbers("f_star"), numbers("c_step"),
                               **kwargs)  # fmt: skip
        return Backtracking(params, **kwargs)
    return GD(params, numbers("lr"), numbers("momentum", 0.0), bool(first.get("nesterov", False)))


def make_trainer(cfg: DictConfig, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
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


def fit(cfg: DictConfig, overrides: list[str] | None = None, output_dir: str | Path | None = None,
        epoch_callbacks: list | tuple = (), tags: dict | None = None, progress: Progress | None = None,
        group_callbacks: list[GroupCallback] | None = None) -> RunResult:  # fmt: skip
    """Train one validated config: a population of one (see `fit_population`)."""
    output_dirs = [output_dir] if output_dir else None
    return fit_population([cfg], [list(overrides or [])], output_dirs, [list(epoch_callbacks)], [tags],
                          progress, group_callbacks=group_callbacks)[0]  # fmt: skip


def fit_population(
    cfgs: list[DictConfig],
    overrides: list[list[str]] | None = None,
    output_dirs: list | None = None,
    epoch_callbacks: list[list] | None = None,
    tags: list[dict | None] | None = None,
    progress: Progress | None = None,
    pbt: PopulationBasedTraining | None = None,
    group_callbacks: list[GroupCallback] | None = None,
) -> list[RunResult]:
    """Train validated configs that share an architecture as one stacked model; one RunResult each.

    Each member's MLflow run is created before training, so an unreachable backend stops the batch
    before any work. Whatever happens later (an exception, Ctrl-C, SIGTERM, divergence, a tracking
    outage), each member's history and artifacts are written to its output directory and its run is
    closed with the matching status. `epoch_callbacks[p]` see member p's every history row (a sweep
    reports to Optuna there, and may raise `gdlab.members.Retire` to prune it); `tags` go on the runs;
    `progress` shows the population's epochs as they go; `pbt` exploits and explores between epochs
    (gdlab.pbt), and each member's run then keeps pbt.json and its replay. `group_callbacks` decide about
    several members at once after each epoch (a sweep trial's replicates, gdlab.module.GroupCallback).
    `wall_time` is the population's.
    """
    population = cfgs if isinstance(cfgs, Population) else Population.from_configs(cfgs, overrides)
    check_population(population)
    n, first = len(population), population.shared
    overrides = population.overrides
    callbacks = [list(c) for c in epoch_callbacks] if epoch_callbacks else [[] for _ in range(n)]
    data = load_population_data(population)
    model = init_population(population, data)
    stops = Stops(
        loss=[-math.inf if v is None else v for v in population.values("trainer.stop_loss")],
        evals=[math.inf if v is None else v for v in population.values("trainer.max_evals")],
    )
    schedules = member_schedules(population)
    logged_numbers = sorted({*schedules, *(pbt.settings.numbers if pbt else ())})
    with quiet_lightning():
        trainer = make_trainer(first, [c for c in (pbt, progress) if c is not None])
    runs = start_runs(population, tags or [None] * n, str(trainer.strategy.root_device))
    directories = [Path(output_dirs[p]) if output_dirs else default_output_dir(population.view(p), runs[p])
                   for p in range(n)]  # fmt: skip
    history_files, run_epochs = HistoryFiles(directories), RunEpochs(runs)
    sinks = [history_files, run_epochs]
    module = TrainingModule(model, optimizer_factory(population), first.backprop, data.evaluation_splits(),
                            stops, callbacks, schedules, logged_numbers, sinks,
                            group_callbacks or (), data.train.weights)  # fmt: skip
    # mini-batch members share their seed (gdlab.members.architecture_key): member 0's orders the batches
    loader = make_loader(data.train, first.optimizer.get("batch_size"), population.members[0]["seed"])
    ending, reason, started = "FAILED", None, time.perf_counter()
    try:
        with quiet_lightning(), torch_threads(first.trainer.get("threads")):
            trainer.fit(module, train_dataloaders=loader)
        ending = None
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        ending, reason = "KILLED", interruption_reason(stop)
        raise
    finally:
        wall_time = time.perf_counter() - started
        history_files.close()
        run_epochs.close()
        results = record(population, module.outcomes(), data, wall_time)
        if pbt is not None:
            try:
                record_pbt(pbt, module.table, results, overrides, directories, runs)
            except Exception as error:  # never at the cost of the members' histories and statuses
                log.warning("gdlab: could not write the PBT record: %s", error)
        complete = history_files.complete(module.table.final_recorded)
        for p, result in enumerate(results):
            if directories[p] is not None:
                save_outputs(result, overrides[p], directories[p], runs[p], ending or status(result), reason,
                             config=population.view(p), history_written=bool(complete[p]),
                             population_size=n)  # fmt: skip
        for result, run in zip(results, runs, strict=True):  # the writer has worked meanwhile
            if run is not None:
                finish_tracking(result, run)
    return results


def member_schedules(population: Population) -> dict[str, list[list[tuple[int, float]]]]:
    """number -> each member's schedule ([] where it has none), for the numbers any member schedules."""
    per_member = [schedules_of(m["optimizer"]) for m in population.members]
    numbers = sorted({number for schedules in per_member for number in schedules})
    return {number: [schedules.get(number, []) for schedules in per_member] for number in numbers}


def record_pbt(pbt: PopulationBasedTraining, table: EpochTable, results: list[RunResult],
               overrides: list[list[str]], directories: list, runs: list) -> None:  # fmt: skip
    """Each member's PBT record: pbt.json in its output directory (an artifact of its run), its replay
    and exploit count in its final numbers and as tags."""
    run_ids = [run.run_id if run is not None else None for run in runs]
    histories = [result.history.to_dict("records") for result in results]
    for p, result in enumerate(results):
        member = pbt.member_record(p, histories, overrides[p], run_ids)
        result.final.update(pbt_exploits=len(member["exploits"]), pbt_replay=" ".join(member["replay"]))
        if directories[p] is not None:
            directories[p].mkdir(parents=True, exist_ok=True)
            (directories[p] / "pbt.json").write_text(json.dumps(member, indent=1))
        if runs[p] is not None:
            runs[p].set_tags({"pbt.exploits": len(member["exploits"]), "pbt.donations": member["donations"],
                              "pbt.member": p, "pbt.replay": result.final["pbt_replay"][:5000]})  # fmt: skip


def start_runs(population: Population, tags, device: str) -> list[MlflowRun | None]:
    if tracking_uri(population.shared) is None:
        return [None] * len(population)
    if len(population) == 1:
        return [MlflowRun(population.view(0), population.overrides[0], device=device, extra_tags=tags[0])]
    # a population's runs are created together and recorded by the writer: training never waits
    views = [population.view(p) for p in range(len(population))]
    return MlflowRun.create_many(views, population.overrides, device, tags)


def status(result: RunResult) -> str:
    """How a member that trained to its end closes: diverged FAILED, else FINISHED. A pruned member is
    FINISHED too (it did what its pruner asked; its tag optuna.state=PRUNED and its name say so): KILLED
    is for runs a signal or a dead process stopped."""
    return "FAILED" if result.final["diverged_at"] is not None and not result.final["pruned"] else "FINISHED"


def record(
    population: Population, outcome: PopulationOutcome, data: Dataset, wall_time: float
) -> list[RunResult]:
    """Each member's RunResult: its history, and final metrics measured once more at its trained weights
    (all members in one batched evaluation)."""
    measured = final_metrics(outcome.model, data)
    table = outcome.table
    table.freeze()
    member_epochs = table.epochs().tolist()
    objective = population.shared.objective
    now, results = time.time(), []
    for p, epochs in enumerate(member_epochs):
        final = {key: values[p] for key, values in measured.items()}
        diverged_at = int(outcome.diverged_at[p]) if outcome.diverged_at[p] >= 0 else None
        final.update(
            epochs=epochs,
            evals_fwd=int(outcome.evals_fwd[p]),
            evals_fwdbwd=int(outcome.evals_fwdbwd[p]),
            evals=int(outcome.evals_fwd[p] + outcome.evals_fwdbwd[p]),
            ls_failures=int(outcome.ls_failures[p]),
            wall_time=wall_time,
            diverged_at=diverged_at,
            pruned=outcome.pruned[p],
        )
        final["ls_all_failed"] = 0 < final["ls_failures"] == epochs  # the search never found a step
        final["objective"] = math.nan if diverged_at is not None else final[objective]
        ended_at = outcome.ended_at[p]
        ended_at = now if math.isnan(ended_at) else float(ended_at)  # NaN: the loop stopped on an exception
        results.append(RunResult(Later(table.history, p), final, Later(outcome.model.member, p),
                                 Later(population.config, p), data, ended_at))  # fmt: skip
    return results


@torch.no_grad()
def final_metrics(model: MLP, data: Dataset) -> dict[str, list]:
    """Every member's final loss and accuracy on each split, and the splits' row counts: name -> P values."""
    n = model.layers[0][0].shape[0] if model.layers[0][0].dim() == 3 else 1
    measured, names = [], []
    for name, split in {"train": data.train, **data.evaluation_splits()}.items():
        device = model.layers[0][0].device
        Z = model(split.X.to(device))
        T, weights = split.T.to(device), split.weights
        weights = weights.to(device) if weights is not None else None
        measured += [model.loss(Z, T, weights).double().reshape(n),
                     model.accuracy(Z, T, weights).double().reshape(n)]  # fmt: skip
        rows = [len(split)] * n if weights is None else (weights > 0).sum(dim=(1, 2)).tolist()
        names += [(name, rows)]
    values = torch.stack(measured).cpu().tolist()
    final: dict[str, list] = {}
    for i, (name, rows) in enumerate(names):
        final[f"rows/{name}"] = rows
        final[f"{name}/loss"], final[f"{name}/acc"] = values[2 * i], values[2 * i + 1]
    return final


ALL_LINE_SEARCHES_FAILED = "every line search failed: no step met the Armijo condition"


def default_output_dir(cfg: DictConfig, run: MlflowRun | None) -> Path | None:
    """Hydra's job directory under gdlab-train; for a tracked gdlab.run, <tracking.dir>/outputs/<run>."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    if run is None:
        return None
    return Path(cfg.tracking.dir).resolve() / "outputs" / f"{run_name(cfg)}-{run.run_id[:8]}"


def save_outputs(result: RunResult, overrides: list[str], output_dir: Path, run: MlflowRun | None,
                 status: str, reason: str | None = None, config=None, history_written: bool = False,
                 population_size: int = 1) -> None:  # fmt: skip
    """History first (it is what an outage or a crash must not lose), then plots, then MLflow. A record that
    cannot be written (a full disk, a read-only folder) ends the run FAILED with the reason. `config`: what
    to save as the run's config (a population member's view of it; default result.config);
    `history_written`: its history.csv holds every row already (gdlab.artifacts.HistoryFiles);
    `population_size`: how many members trained with it (tracking.plots=auto draws a single run's PNGs)."""
    result.final["output_dir"] = str(output_dir)
    config = result.config if config is None else config
    problem = write_outputs(result, overrides, output_dir, config, history_written, population_size)
    if problem:  # the caller says so (gdlab-train's last line, gdlab.run's warning, the trial's failure)
        result.final["record_error"], status = problem, "FAILED"
    if run is None:
        return
    if problem or reason:  # an incomplete record says so first; else why the run was stopped
        run.set_tags({"failure.reason": problem or reason})
    if result.final["pruned"]:
        run.set_tags({"optuna.state": "PRUNED", "pruned.reason": result.final["pruned"],
                      "mlflow.runName": f"{run.name} (pruned)"})  # fmt: skip
    if result.final["diverged_at"] is not None:
        run.set_tags({"failure.reason": "loss became NaN/inf", "failure.epoch": result.final["diverged_at"]})
    if result.final["ls_all_failed"]:
        run.set_tags({"gdlab.warning": ALL_LINE_SEARCHES_FAILED})
    run.log_final(result.final)
    run.close(status, output_dir, end_time=result.ended_at)


def draws_plots(plots: bool | str, population_size: int) -> bool:
    """tracking.plots: true, false, or auto (a single run's PNGs, not each of a population's members': ~0.4 s
    a member, where a sweep's report compares them in one figure)."""
    return plots is True or (plots == "auto" and population_size == 1)


def write_outputs(result: RunResult, overrides: list[str], output_dir: Path, cfg,
                  history_written: bool = False, population_size: int = 1) -> str | None:  # fmt: skip
    """Write the run's files (history.csv unless `history_written`); what kept the record from being written
    (None: nothing)."""
    try:
        if not history_written:
            write_history(output_dir, result.history)
        masked_overrides = [mask_passwords(o) for o in overrides]
        plots = draws_plots(cfg.tracking.get("plots", "auto"), population_size)
        write_run_outputs(
            output_dir,
            masked_config_yaml(cfg),
            run_name(cfg),
            masked_overrides,
            result.history if plots else None,
            result.model,
            result.data,
            plots=plots,
        )
    except OSError as error:
        return record_error(error, output_dir)
    except Exception as error:  # a plot must never cost the run its history or its MLflow status
        log.warning("gdlab: could not write every artifact to %s: %s", output_dir, error)
    return None


def record_error(error: OSError, output_dir: Path) -> str:
    """An OSError as a run's failure reason: "no space left on device writing /path/history.csv"."""
    what = (error.strerror or type(error).__name__).lower()
    return f"{what} writing {error.filename or output_dir}"


def finish_tracking(result: RunResult, run: MlflowRun) -> None:
    """Wait for the run's record to be written (by this process, if the writer died meanwhile); note the run
    (and any outage) on the result."""
    run.wait()
    if run.writer_died:
        log.warning("gdlab: the metric writer process died; writing run %s's record from this process",
                    run.run_id)  # fmt: skip
        output_dir = result.final.get("output_dir")
        run.rewrite(result.history.to_dict("records"), result.final, Path(output_dir) if output_dir else None)
    result.final.update(
        mlflow_run_id=run.run_id, tracking_outage=run.outage, tracking_uri=mask_passwords(run.uri)
    )
    if run.outage:
        log.warning(
            "gdlab: the tracking backend failed during the run (%s); the full history is in %s",
            run.outage,
            result.final["output_dir"] + "/history.csv",
        )


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
