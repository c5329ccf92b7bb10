"""The fit lifecycle, once for every run: build → fit → record (gdlab.record: outputs, tracking status).

`fit_population` trains validated configs that share an architecture as one stacked model
(`gdlab.module.TrainingModule`); `fit` is a population of one. Each member gets what a run alone
gets: its own history, final metrics, output directory and MLflow run, closed FINISHED, FAILED
(diverged, or an exception) or KILLED (Ctrl-C, SIGTERM); a member an epoch callback retired (a sweep's
pruner) is FINISHED with tag optuna.state=PRUNED.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from gdlab import import_gc
from gdlab.artifacts import HistoryFiles
from gdlab.data import N_CLASSES, Dataset, load_dataset, load_folds, make_loader
from gdlab.interrupts import interruption_reason
from gdlab.member_runs import end_unclosed
from gdlab.model import MLP, draw_layer, encode_targets, initialize, layer_sizes
from gdlab.module import GroupCallback, Stops, TrainingModule
from gdlab.optimizers import GD, Adam, Backtracking, LBFGSStep, MemberOptimizer, member_tensor
from gdlab.pbt import PopulationBasedTraining
from gdlab.population import Population, check_population
from gdlab.progress import Progress
from gdlab.record import (
    PendingRecords,
    RunResult,
    default_output_dir,
    finish_tracking,
    log_inputs,
    log_trained_model,
    note_run,
    record,
    record_pbt,
    save_outputs,
    start_runs,
    status,
    wants_model,
)
from gdlab.run_epochs import RunEpochs
from gdlab.schedules import schedules_of
from gdlab.step_rules import BarzilaiBorwein, NonMonotone, Polyak

log = logging.getLogger("gdlab")
DTYPES = {32: torch.float32, 64: torch.float64}
LIGHTNING_PRECISION = {32: "32-true", 64: "64-true"}
BACKTRACKING_NUMBERS = ("lr", "c", "beta", "growth", "lr_max", "lr_min", "max_backtracks", "tiny_step")


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
    record_later: PendingRecords | None = None,
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
    `wall_time` is the population's. The runs' records are written when this returns, or, given
    `record_later`, handed to it for the caller to wait for (the results already name their runs).
    """
    import_gc.resume()  # a command's imports are done (gdlab.import_gc)
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
    try:  # a signal (or an error) before training still ends the runs just created
        log_inputs(runs, population, data)
        directories = [Path(output_dirs[p]) if output_dirs else
                       default_output_dir(population.view(p), runs[p]) for p in range(n)]  # fmt: skip
        history_files, run_epochs = HistoryFiles(directories), RunEpochs(runs)
        sinks = [history_files, run_epochs]
        module = TrainingModule(model, optimizer_factory(population), first.backprop,
                                data.evaluation_splits(), stops, callbacks, schedules, logged_numbers, sinks,
                                group_callbacks or (), data.train.weights)  # fmt: skip
        # mini-batch members share their seed (gdlab.members.architecture_key): member 0's orders the batches
        loader = make_loader(data.train, first.optimizer.get("batch_size"), population.members[0]["seed"])
    except BaseException as stop:
        end_unclosed(runs, stop, "before training")
        raise
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
        try:  # a signal while the record is written: the runs not closed yet end KILLED, not RUNNING
            history_files.close()
            run_epochs.close()
            results = record(population, module.outcomes(), data, wall_time)
            if pbt is not None:
                try:
                    record_pbt(pbt, module.table, results, overrides, directories, runs)
                except Exception as error:  # never at the cost of the members' histories and statuses
                    log.warning("gdlab: could not write the PBT record: %s", error)
            if ending is None and n == 1 and runs[0] is not None and wants_model(first):
                log_trained_model(runs[0], results[0])
            complete = history_files.complete(module.table.final_recorded)
            for p, result in enumerate(results):
                if directories[p] is not None:
                    save_outputs(result, overrides[p], directories[p], runs[p], ending or status(result),
                                 reason, config=population.view(p), history_written=bool(complete[p]),
                                 population_size=n)  # fmt: skip
            for result, run in zip(results, runs, strict=True):  # the writer has worked meanwhile
                if run is not None and record_later is not None:
                    note_run(result, run)
                    record_later.add(result, run)
                elif run is not None:
                    finish_tracking(result, run)
        except BaseException as stop:
            end_unclosed(runs, stop, "while recording")
            raise
    return results


def member_schedules(population: Population) -> dict[str, list[list[tuple[int, float]]]]:
    """number -> each member's schedule ([] where it has none), for the numbers any member schedules."""
    per_member = [schedules_of(m["optimizer"]) for m in population.members]
    numbers = sorted({number for schedules in per_member for number in schedules})
    return {number: [schedules.get(number, []) for schedules in per_member] for number in numbers}


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
