"""Entry points: `gdlab-train` (a Hydra app) and `gdlab.run([...])` for notebooks.

conf → compose (gdlab.compose) → validate (gdlab.config) → fit (gdlab.fit: build, train) → record
(gdlab.record: results, outputs, the MLflow run's end) → summary and the objective a sweeper optimizes.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.data import SPLIT_METRICS
from gdlab.interrupts import InterruptHandler, exit_code_of, interruption_reason
from gdlab.masking import mask_saved_hydra_configs
from gdlab.population import PopulationComposer, check_population
from gdlab.replicates import ReplicatedResult
from gdlab.schedules import SCHEDULABLE, SCHEDULE_SUFFIX, schedules_of
from gdlab.tracking import (
    OUTPUT_DIR_TAG,
    TrackingUnavailable,
    flatten,
    run_name,
    short_number,
    trial_run_name,
)

if TYPE_CHECKING:
    from gdlab.pbt_rules import PBTSettings
    from gdlab.progress import Progress
    from gdlab.record import RunResult

__all__ = ["RunResult", "main", "run", "summary"]
last_mlflow_run_id: str | None = None  # the MLflow run of gdlab-train's last job (Hydra multirun notes it)
# Why a job stopped ("interrupted by SIGTERM"): Hydra then ends the multirun in a `finally`, and the multirun
# callback ends the sweep's parent run KILLED instead of refitting (gdlab.sweep.parent_run).
stopped_by: str | None = None
# Lightning (torch._dynamo, torchmetrics, scipy.signal: ~3 s) is imported once a config is valid, so bad
# input is refused at once (gdlab.fit and gdlab.progress are imported where a run starts).
# Hydra 1.4 warns on every instantiate without an execution whitelist, including the ones it makes itself
# from gdlab's own config (our sweep callback, the sweeper's Optuna sampler): those targets are ours.
warnings.filterwarnings(
    "ignore",
    message=r"hydra\.utils\.instantiate\(\) resolved _target_='(gdlab|optuna)\.",
    category=UserWarning,
)


def run(overrides: list[str] | None = None, output_dir: str | Path | None = None,
        population: list | None = None, pbt: PBTSettings | None = None, replicates: int = 1
        ) -> RunResult | list[RunResult] | ReplicatedResult | list[ReplicatedResult]:  # fmt: skip
    """Train one run from CLI-style overrides, e.g. ``run(["dataset=xor", "optimizer.lr=0.5"])``.

    With `population`, a list of per-member overrides (dicts like ``{"optimizer.lr": 0.1}`` or lists
    of "key=value"), train one run per member on top of `overrides`: those sharing an architecture
    together as one stacked model (gdlab.fit.fit_population). Returns one RunResult per member, in order;
    with `output_dir`, member i writes to <output_dir>/member-i. With `pbt` (a `gdlab.PBTSettings`), the
    population trains with Population Based Training (gdlab.pbt): each result's history then has the
    `hp/optimizer.<number>` it trained with, and final["pbt_replay"] the overrides that replay its weights.

    With `replicates=k` (gdlab.replicates), each configuration trains k times, with seeds seed, seed+1, ...,
    seed+k-1, as members of one population; the result is a `ReplicatedResult` per configuration (its k
    runs, their objectives, mean, standard deviation and 95% interval), one or a list as without.
    """
    from gdlab.fit import fit, fit_population

    overrides = list(overrides or [])
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ConfigError(f"replicates={replicates!r} must be an integer >= 1")
    if pbt is not None and population is None:
        raise ConfigError("pbt needs population=[...], a list of two or more members to train together")
    if pbt is not None and replicates > 1:
        raise ConfigError("replicates=k with pbt is not supported (PBT copies between members, so a "
                          "configuration's replicates would not stay its own); use replicates=1")  # fmt: skip
    if population is None and replicates == 1:
        cfg = validate(compose_config(overrides))
        return warn_incomplete([fit(cfg, overrides, output_dir, progress=progress_of([cfg]))])[0]
    configurations = PopulationComposer(overrides)(population if population is not None else [{}])
    members = configurations.replicated(replicates)
    n = len(members)
    output_dirs = member_directories(output_dir, len(configurations), replicates, population is None)
    results: list = [None] * n
    groups = members.architecture_groups()
    for group in groups:  # every population is checked before any trains
        check_population(members.subset(group))
    if pbt is not None:
        check_pbt(pbt, [members.config(p) for p in range(n)], groups)
    for group in groups:
        part = members.subset(group)
        trained = fit_population(
            part,
            output_dirs=[output_dirs[i] for i in group] if output_dirs else None,
            progress=progress_of([part.shared], [f"member {i}" for i in group]),
            pbt=population_based_training(pbt, part.shared, len(group)),
        )
        for i, result in zip(group, trained, strict=True):
            results[i] = result
    results = warn_incomplete(results)
    if replicates == 1:
        return results
    seeds = members.values("seed")
    replicated = [ReplicatedResult.of(results[i : i + replicates], seeds[i : i + replicates])
                  for i in range(0, n, replicates)]  # fmt: skip
    return replicated[0] if population is None else replicated


def member_directories(output_dir, configurations: int, replicates: int, single: bool) -> list[Path] | None:
    """<output_dir>/member-i, or with replicates <output_dir>/[member-i/]replicate-r."""
    if not output_dir:
        return None
    if replicates == 1:
        return [Path(output_dir) / f"member-{i}" for i in range(configurations)]
    return [Path(output_dir) / ("" if single else f"member-{i}") / f"replicate-{r}"
            for i in range(configurations) for r in range(replicates)]  # fmt: skip


def warn_incomplete(results: list[RunResult]) -> list[RunResult]:
    """A notebook's notice of runs whose record could not be written (they ended FAILED)."""
    for result in results:
        if result.final.get("record_error"):
            warnings.warn(f"gdlab: {result.final['record_error']}; the run ended FAILED", stacklevel=3)
    return results


def check_pbt(settings: PBTSettings, cfgs: list[DictConfig], groups: list[list[int]]) -> None:
    """PBT's settings, as a sweep file's are checked; one population of members that differ only in what
    PBT changes (a member's replay starts from its own config), each a number its optimizer may change,
    searched between bounds the config accepts."""
    from gdlab.pbt_rules import settings_problem

    problem = settings_problem(settings.interval, settings.fraction, settings.perturb,
                               settings.resample_probability, settings.seed)  # fmt: skip
    if problem:
        raise ConfigError(f"pbt.{problem}")
    if len(groups) != 1 or len(cfgs) < 2:
        raise ConfigError(
            f"pbt needs one population of two or more members sharing an architecture; got {len(cfgs)} "
            f"member(s) in {len(groups)} population(s)"
        )
    name = cfgs[0].optimizer.name
    allowed = [f"optimizer.{n}" for n in SCHEDULABLE[name]]
    for key, space in settings.hyperparameters.items():
        if key not in allowed:
            raise ConfigError(f"pbt hyperparameter {key!r} is not allowed with optimizer.name={name}; "
                              f"choose from {'|'.join(allowed) or 'none'}")  # fmt: skip
        if not all(hasattr(space, a) for a in ("low", "high", "log", "step")):
            raise ConfigError(f"pbt hyperparameter {key}: {space!r} must be an optuna FloatDistribution")
        if any(OmegaConf.select(cfg, f"{key}{SCHEDULE_SUFFIX}") is not None for cfg in cfgs):
            raise ConfigError(f"pbt hyperparameter {key} is PBT's, so {key}{SCHEDULE_SUFFIX} must be null")
        for i, cfg in enumerate(cfgs):  # explore keeps a value inside the bounds: a member starts there too
            value = OmegaConf.select(cfg, key)
            if value is None or not space.low <= value <= space.high:
                raise ConfigError(f"population[{i}] {key}={value!r} is outside the pbt search space; "
                                  f"allowed: [{space.low:g}, {space.high:g}]")  # fmt: skip
        for bound in (space.low, space.high):
            edge = OmegaConf.create(OmegaConf.to_container(cfgs[0]))
            OmegaConf.update(edge, key, bound)
            validate(edge)
    differing = differing_keys(cfgs, settings.hyperparameters)
    if differing:
        raise ConfigError(f"pbt members may differ only in {', '.join(settings.hyperparameters)}; these also "
                          f"differ: {', '.join(differing)}")  # fmt: skip


def differing_keys(cfgs: list[DictConfig], allowed) -> list[str]:
    """Flattened config keys whose values differ between `cfgs`, outside `allowed`."""
    flat = [flatten(cfg) for cfg in cfgs]
    keys = {key for f in flat for key in f}
    return sorted(k for k in keys if k not in allowed and len({f.get(k) for f in flat}) > 1)


def population_based_training(settings: PBTSettings | None, cfg: DictConfig, n_members: int):
    if settings is None:
        return None
    from gdlab.pbt import PopulationBasedTraining

    return PopulationBasedTraining(settings, cfg.objective, cfg.direction, n_members)


def progress_of(cfgs: list[DictConfig], names: list[str] | None = None) -> Progress | None:
    """A run's (or a population's) live progress, as this process's output suits it (gdlab.progress)."""
    from gdlab.progress import Progress

    count = len(names or cfgs)
    label = run_name(cfgs[0]) if count == 1 else f"population of {count}"
    return Progress.auto(label, names or [label], cfgs[0].objective, cfgs[0].direction)


def scheduled(cfg: DictConfig) -> str:
    """ " lr_schedule=6.35@0,5.08@20": each schedule a run trains with, value@epoch (gdlab.schedules)."""
    return "".join(
        f" {number}{SCHEDULE_SUFFIX}=" + ",".join(f"{short_number(value)}@{epoch}" for epoch, value in points)
        for number, points in schedules_of(cfg.optimizer).items()
    )


def summary(result: RunResult) -> str:
    from gdlab.record import ALL_LINE_SEARCHES_FAILED

    f, cfg = result.final, result.config
    parts = [f"{k}={f[k]:.6g}" for k in SPLIT_METRICS if k in f]
    lines = [
        f"gdlab: {cfg.dataset.name} {cfg.optimizer.name} lr={cfg.optimizer.lr}{scheduled(cfg)} "
        f"depth={cfg.model.depth} backprop={cfg.backprop} seed={cfg.seed}",
        "final: " + " ".join(parts),
        f"epochs={f['epochs']} evals={f['evals']} (forward {f['evals_fwd']}, forward+backward "
        f"{f['evals_fwdbwd']}) line_search_failures={f['ls_failures']} wall_time={f['wall_time']:.2f}s",
    ]
    if f.get("mlflow_run_id"):
        experiment = cfg.tracking.experiment or cfg.dataset.name
        lines.append(f"mlflow run {f['mlflow_run_id']} in experiment '{experiment}' at {f['tracking_uri']}")
    if f.get("model_uri"):
        registered = f" (registered: {f['registered_model']})" if f.get("registered_model") else ""
        lines.append(f"mlflow model {f['model_uri']}{registered}")
    if f.get("tracking_outage"):
        lines.append(f"tracking outage: {f['tracking_outage']}; full history kept in {f['output_dir']}")
    if f.get("ls_all_failed"):
        lines.append(f"warning: {ALL_LINE_SEARCHES_FAILED} in any of the {f['epochs']} epochs "
                     f"(optimizer.on_failure={cfg.optimizer.on_failure})")  # fmt: skip
    if f["diverged_at"] is not None:
        lines.append(f"diverged: loss became NaN/inf at epoch {f['diverged_at']}; objective is NaN")
    lines.append(f"objective {cfg.objective} ({cfg.direction}) = {f['objective']:.6g}")
    return "\n".join(lines)


@hydra.main(config_path="pkg://gdlab.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.raiseExceptions = False  # a full disk under Hydra's job log: no traceback, gdlab says what failed
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        mask_saved_hydra_configs(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    try:
        cfg = validate(cfg)
    except ConfigError as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from gdlab.fit import fit
    from gdlab.record import record_error

    overrides = list(hydra_cfg.overrides.task)
    ctrl_c = InterruptHandler().install((signal.SIGINT,))  # SIGTERM is Lightning's (below)
    try:
        tags = {OUTPUT_DIR_TAG: hydra_cfg.runtime.output_dir,
                **(multirun_tags(hydra_cfg, overrides, cfg) or {})}  # fmt: skip
        result = fit(cfg, overrides, tags=tags, progress=progress_of([cfg]))
    except TrackingUnavailable as error:
        print(f"gdlab-train: error: {error}", file=sys.stderr)
        sys.exit(3)
    except OSError as error:  # the record could not be written: a full disk, a read-only folder
        reason = record_error(error, hydra_cfg.runtime.output_dir)
        print(f"gdlab-train: error: {reason}; the run ended FAILED", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:  # Lightning's: raised at the end of the epoch that received SIGTERM
        note_stop("interrupted by SIGTERM")
        print(f"gdlab-train: stopped by SIGTERM; the run ended KILLED, its history is in "
              f"{hydra_cfg.runtime.output_dir}", file=sys.stderr)  # fmt: skip
        sys.exit(143)
    except (KeyboardInterrupt, SystemExit):
        if ctrl_c.signum is None:
            raise
        note_stop("interrupted by SIGINT")
        print(f"gdlab-train: interrupted by SIGINT (Ctrl-C); the run ended KILLED, its history is in "
              f"{hydra_cfg.runtime.output_dir}", file=sys.stderr)  # fmt: skip
        sys.exit(ctrl_c.exit_code)
    print(summary(result), flush=True)
    if result.final.get("record_error"):
        print(f"gdlab-train: error: {result.final['record_error']}; the run ended FAILED", file=sys.stderr)
        sys.exit(1)
    global last_mlflow_run_id
    last_mlflow_run_id = result.final.get("mlflow_run_id")  # for the multirun callback's on_job_end
    return result.final["objective"]


def main_or_interrupted() -> int | None:
    """gdlab-train: `main`, where a Ctrl-C or SIGTERM that escapes it (one between a multirun's jobs: each job
    handles its own) is one line on stderr and exit 128 + the signal, not a traceback. Where the multirun's
    callback ended a parent run KILLED, it has said so (`stopped_by`)."""
    try:
        return main()
    except KeyboardInterrupt as stop:
        if stopped_by is None:
            print(f"gdlab-train: {interruption_reason(stop)}", file=sys.stderr)
        return exit_code_of(stop)


def note_stop(reason: str) -> None:
    global stopped_by
    stopped_by = reason


def multirun_tags(hydra_cfg, overrides: list[str], cfg: DictConfig) -> dict | None:
    """A job of Hydra's Optuna sweeper: a run name that leads with the values the sweep varies."""
    from hydra.types import RunMode

    searched = hydra_cfg.sweeper.get("params") if hydra_cfg.mode == RunMode.MULTIRUN else None
    if not searched:
        return None
    values = dict(override.lstrip("+").split("=", 1) for override in overrides if "=" in override)
    varied = {key: values[key] for key in searched if key in values}
    return {"mlflow.runName": trial_run_name(varied, hydra_cfg.job.num, cfg)} if varied else None


def __getattr__(name: str):
    if name == "RunResult":  # gdlab.train.RunResult, without importing Lightning at import
        from gdlab.record import RunResult

        return RunResult
    raise AttributeError(f"module 'gdlab.train' has no attribute {name!r}")


if __name__ == "__main__":  # `python -m gdlab.train`: gdlab-train itself (gdlab.entry.train)
    # This file runs as __main__, a second copy of the module: the job's notes (`stopped_by`,
    # `last_mlflow_run_id`) must go to the gdlab.train that the sweep's callback reads, so that one runs.
    import gdlab.train
    from gdlab.interrupts import PENDING
    from gdlab.process_exit import exit_now

    PENDING.install()
    exit_now(gdlab.train.main_or_interrupted)
