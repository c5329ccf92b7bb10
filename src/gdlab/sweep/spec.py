"""A named sweep (sweeps/NAME.yaml) parsed and checked before any trial runs: the SweepSpec.

The sweep file is the one Hydra's Optuna sweeper reads for `gdlab-train -m +sweep=NAME`; its search
space is parsed by that plugin's own override-to-distribution code, and its sampler, pruner and custom
search space hook are made with Hydra's instantiate.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution

from gdlab.compose import compose_config, search_path_override
from gdlab.config import MAX_FOLDS, ConfigError, check_fits, check_number, validate
from gdlab.pbt_rules import PBTSettings, settings_problem
from gdlab.population import PopulationComposer
from gdlab.replicates import AGGREGATES
from gdlab.schedules import SCHEDULABLE, SCHEDULE_SUFFIX
from gdlab.sweep.first_batch import FIRST_BATCH
from gdlab.sweep.selection import check_selection, refit_enabled
from gdlab.sweep.signature import experiment_signature

# What a sweep file may instantiate: Optuna's samplers and pruners, and gdlab's search-space hooks.
TRUSTED_TARGETS = ["optuna.samplers.*", "optuna.pruners.*", "gdlab.sweep.*"]


class SweepError(ValueError):
    """A sweep name, file or search space gdlab-sweep cannot run."""


@dataclass
class SweepSpec:
    name: str
    overrides: list[str]  # extra CLI overrides, applied to every trial
    task: DictConfig  # the sweep-level config (no hydra node)
    distributions: dict
    fixed_params: dict
    study_name: str
    storage: str
    direction: str
    budget: int
    sampler: optuna.samplers.BaseSampler
    sampler_cfg: DictConfig  # hydra.sweeper.sampler, to draw the sampler again with another seed
    pruner: optuna.pruners.BasePruner
    report_every: int
    max_failure_rate: float
    custom_search_space: object | None
    population: int  # trials asked and trained together as one batched model (1: one at a time)
    first_batch: str = "sampler"  # gdlab_sweep.first_batch: how a new study's first batch is drawn
    signature: dict = field(default_factory=dict)  # gdlab.sweep.signature: what a trial computes
    composer: PopulationComposer | None = field(default=None, repr=False)  # made on first use
    progress_every: float = 10.0  # seconds between progress lines in a log (gdlab-sweep --progress)
    pbt: PBTSettings | None = None  # gdlab_sweep.pbt: Population Based Training inside each population
    replicates: int = 1  # gdlab_sweep.replicates: each trial's configuration trained with k seeds
    aggregate: str = "mean"  # gdlab_sweep.aggregate: a trial's value from its members' (gdlab.replicates)
    cv_folds: int = 1  # gdlab_sweep.cv_folds: each trial validates on k folds, one member each (1: none)
    source: str = ""  # the sweep file, as messages name it (sweeps/lr.yaml)
    edges: list = field(default_factory=list, repr=False)  # validated configs at the search space's edges

    @property
    def members(self) -> int:
        """Members a trial trains: one per fold and seed (gdlab.replicates)."""
        return self.cv_folds * self.replicates


def available_sweeps(config_dir: Path | None = None) -> list[str]:
    """The shipped sweeps (sweeps/), plus those in <config_dir>/sweep/."""
    from importlib.resources import files

    folders = [files("gdlab.conf") / "sweep"] + ([Path(config_dir) / "sweep"] if config_dir else [])
    return sorted({p.name[: -len(".yaml")] for folder in folders if folder.is_dir()
                   for p in folder.iterdir() if p.name.endswith(".yaml")})  # fmt: skip


def sweep_source(name: str, config_dir: Path | None) -> str:
    """The sweep file as messages name it: a shipped sweep wins over one of the same name in
    <config_dir>/sweep/, as in Hydra's search path."""
    if config_dir is None or name in available_sweeps():
        return f"sweeps/{name}.yaml"
    return str(Path(config_dir) / "sweep" / f"{name}.yaml")


def load_sweep(name: str, overrides: list[str] | None = None, config_dir: Path | None = None) -> SweepSpec:
    """Parse and check a named sweep before any trial runs."""
    given, overrides = list(overrides or []), [*search_path_override(config_dir), *(overrides or [])]
    if name not in available_sweeps(config_dir):
        raise SweepError(f"unknown sweep {name!r}; available: {', '.join(available_sweeps(config_dir))}")
    source = sweep_source(name, config_dir)
    try:
        full = compose_config([f"+sweep={name}", *overrides], return_hydra_config=True)
    except HydraException as error:
        raise SweepError(f"{source}: {one_line(error)}") from error
    sweeper = full.hydra.sweeper
    task = OmegaConf.create({k: v for k, v in OmegaConf.to_container(full).items() if k != "hydra"})
    folds = OmegaConf.select(task, "gdlab_sweep.cv_folds")
    if folds is not None and OmegaConf.select(task, "dataset.cv_folds") != folds:
        if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
            raise SweepError(f"{source}: gdlab_sweep.cv_folds={folds!r} must be an integer in "
                             f"[2, {MAX_FOLDS}]")  # fmt: skip
        # every trial validates on k folds of the non-test rows: its members' dataset says so
        return load_sweep(name, [*given, "dataset.val_size=0", f"dataset.cv_folds={folds}"], config_dir)
    space = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    try:
        distributions, fixed_params, _ = create_params_from_overrides(space)
    except Exception as error:
        raise SweepError(f"{source}: hydra.sweeper.params: {error}") from error
    edges = check_search_space(name, source, overrides, task, full, distributions)
    check_sweep_settings(source, full, task.get("gdlab_sweep") or {}, distributions, overrides)
    try:
        check_selection(task)
        refit_enabled(task)
    except ConfigError as error:
        raise SweepError(f"{source}: {error}") from error
    extra = task.get("gdlab_sweep") or {}
    try:
        sampler, pruner, custom = build_optuna_parts(sweeper, extra, distributions)
    except Exception as error:  # a bad _target_ or argument in the sweep file
        raise SweepError(f"{source}: {str(error).splitlines()[0]}") from error
    population = extra.get("population", 1)
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise SweepError(f"{source}: gdlab_sweep.population={population!r} must be an integer >= 1")
    first_batch = extra.get("first_batch", "sampler")
    if first_batch not in FIRST_BATCH:
        raise SweepError(f"{source}: gdlab_sweep.first_batch={first_batch!r} is not allowed; choose one of "
                         f"{'|'.join(FIRST_BATCH)}")  # fmt: skip
    aggregate = extra.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise SweepError(f"{source}: gdlab_sweep.aggregate={aggregate!r} is not allowed; choose one of "
                         f"{'|'.join(AGGREGATES)}")  # fmt: skip
    spec = SweepSpec(
        name=name,
        overrides=overrides,
        task=task,
        distributions=distributions,
        fixed_params=fixed_params,
        study_name=sweeper.study_name or name,
        storage=sweeper.storage or "sqlite:///mlruns/optuna.db",
        direction=getattr(sweeper.direction, "name", str(sweeper.direction)),
        budget=int(sweeper.n_trials),
        sampler=sampler,
        sampler_cfg=sweeper.sampler,
        pruner=pruner,
        report_every=int(extra.get("report_every", 10)),
        max_failure_rate=float(extra.get("max_failure_rate", 0.5)),
        custom_search_space=custom,
        population=population,
        first_batch=first_batch,
        signature=experiment_signature(task, sweeper.params, overrides),
        pbt=parse_pbt(source, extra.get("pbt"), task, distributions, pruner, custom),
        source=source,
        edges=edges,
        aggregate=aggregate,
        cv_folds=task.dataset.get("cv_folds") or 1,
    )
    if spec.cv_folds > 1 and spec.pbt is not None:
        raise SweepError(f"{source}: gdlab_sweep.cv_folds={spec.cv_folds} with gdlab_sweep.pbt is not "
                         "supported (PBT copies between members, so a trial's folds would not stay its own); "
                         "drop one")  # fmt: skip
    set_replicates(spec, extra.get("replicates", 1), f"{source}: gdlab_sweep.replicates")
    return spec


def set_replicates(spec: SweepSpec, k, where: str) -> None:
    """Each trial trains its configuration k times (seeds seed ... seed+k-1); the trial's value is the
    aggregate of theirs, so k and the aggregate are part of the experiment (the study's signature)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SweepError(f"{where}={k!r} must be an integer >= 1")
    if k > 1 and spec.pbt is not None:
        raise SweepError(f"{where}={k} with gdlab_sweep.pbt is not supported (PBT copies between members, "
                         "so a trial's replicates would not stay its own); use 1")  # fmt: skip
    spec.replicates = k
    spec.signature.pop("gdlab_sweep.replicates", None)
    spec.signature.pop("gdlab_sweep.aggregate", None)
    if k > 1:
        spec.signature["gdlab_sweep.replicates"] = json.dumps(k)
        spec.signature["gdlab_sweep.aggregate"] = json.dumps(spec.aggregate)


PBT_KEYS = ("interval", "fraction", "perturb", "resample_probability", "hyperparameters", "seed")


def parse_pbt(
    source: str, block, task: DictConfig, distributions: dict, pruner, custom
) -> PBTSettings | None:
    """gdlab_sweep.pbt, checked: each problem is one SweepError naming the key and what is allowed."""
    if block is None:
        return None
    where = f"{source}: gdlab_sweep.pbt"
    if not isinstance(block, DictConfig):
        raise SweepError(f"{where}={block!r} must be a mapping with keys {', '.join(PBT_KEYS)}")
    unknown = sorted(set(block) - set(PBT_KEYS))
    if unknown:
        raise SweepError(f"{where}.{unknown[0]} is not a PBT setting; allowed: {', '.join(PBT_KEYS)}")
    default = {f.name: f.default for f in fields(PBTSettings)}
    interval, seed = block.get("interval", default["interval"]), block.get("seed", default["seed"])
    fraction = block.get("fraction", default["fraction"])
    probability = block.get("resample_probability", default["resample_probability"])
    perturb = block.get("perturb", default["perturb"])
    perturb = tuple(perturb) if isinstance(perturb, ListConfig) else perturb
    problem = settings_problem(interval, fraction, perturb, probability, seed)
    if problem:
        raise SweepError(f"{where}.{problem}")
    if custom is not None:
        raise SweepError(f"{where}: hydra.sweeper.custom_search_space does not go with PBT (its members may "
                         "differ only in pbt.hyperparameters)")  # fmt: skip
    hyperparameters = pbt_hyperparameters(where, block.get("hyperparameters"), task, distributions)
    if not isinstance(pruner, optuna.pruners.NopPruner):
        raise SweepError(
            f"{source}: gdlab_sweep.pruner={type(pruner).__name__} does not go with "
            "gdlab_sweep.pbt (PBT replaces a bad member instead); use optuna.pruners.NopPruner"
        )
    factors = tuple(float(f) for f in perturb)
    return PBTSettings(hyperparameters, interval, float(fraction), factors, float(probability), seed)


def pbt_hyperparameters(
    where: str, keys, task: DictConfig, distributions: dict
) -> dict[str, FloatDistribution]:
    """The searched optimizer numbers PBT may change: each a float range of the search space (its bounds
    are explore's), of a number this optimizer may change between epochs; and nothing else searched, so
    members differ only in what PBT manages."""
    optimizer = task.optimizer.name
    allowed = [f"optimizer.{n}" for n in SCHEDULABLE.get(optimizer, ())]
    if "optimizer" in distributions:
        raise SweepError(
            f"{where}: the search space varies the optimizer; PBT needs one optimizer for all members"
        )
    if not isinstance(keys, ListConfig) or not keys:
        raise SweepError(f"{where}.hyperparameters={keys!r} must be a non-empty list; with optimizer.name="
                         f"{optimizer} choose from {'|'.join(allowed) or 'none'}")  # fmt: skip
    for key in keys:
        if key not in allowed:
            raise SweepError(
                f"{where}.hyperparameters: {key!r} is not allowed with optimizer.name={optimizer}; "
                f"choose from {'|'.join(allowed) or 'none'}"
            )
        if not isinstance(distributions.get(key), FloatDistribution):
            raise SweepError(f"{where}.hyperparameters: {key} must be searched as a float range in "
                             "hydra.sweeper.params (its bounds are where explore stays)")  # fmt: skip
        if OmegaConf.select(task, f"{key}{SCHEDULE_SUFFIX}") is not None:
            raise SweepError(
                f"{where}.hyperparameters: {key} is PBT's, so {key}{SCHEDULE_SUFFIX} must be null"
            )
    others = sorted(set(distributions) - set(keys))
    if others:
        raise SweepError(
            f"{where}: the search space also varies {', '.join(others)}; PBT members may differ only "
            f"in pbt.hyperparameters ({', '.join(keys)})"
        )
    return {key: distributions[key] for key in keys}


def check_pbt_population(spec: SweepSpec) -> None:
    """PBT needs members to copy between: population mode with two or more."""
    if spec.pbt is not None and spec.population < 2:
        raise SweepError(
            f"{spec.source}: gdlab_sweep.pbt needs population mode; gdlab_sweep.population "
            f"(or --population) is {spec.population}, use an integer >= 2"
        )


def build_sampler(sampler_cfg: DictConfig, distributions: dict, **arguments) -> optuna.samplers.BaseSampler:
    """The sweep file's sampler, with Hydra's instantiate (`arguments` override the file's)."""
    sampler = instantiate(sampler_cfg, **arguments, _execution_whitelist_=TRUSTED_TARGETS)
    if isinstance(sampler, partial):  # GridSampler: its grid comes from the search space
        grid = {k: OptunaSweeperImpl._to_grid_sampler_choices(d) for k, d in distributions.items()}
        sampler = sampler(search_space=grid)
    return sampler


def sampler_for_stream(spec: SweepSpec, trials_before: int, worker: int,
                       first: bool = False) -> optuna.samplers.BaseSampler:  # fmt: skip
    """The sweep's sampler for one stream of draws: an invocation that finds `trials_before` trials in the
    study, as its worker number `worker`; `first`: this process created the study.

    A sampler seeded from the sweep file draws the same values in every process. The process that
    created the study keeps the file's seed while the study is empty (so a fresh sweep reproduces); every
    other stream gets a seed derived from it and from this process's own identity (pid, host, a random
    nonce), so workers, later invocations and invocations started in the same second all draw their own
    values, and a resumed study goes on instead of replaying.
    """
    seed = spec.sampler_cfg.get("seed")
    if seed is None or (first and (trials_before, worker) == (0, 0)):
        return spec.sampler
    identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{seed}:{trials_before}:{worker}:{identity}".encode()).digest()
    return build_sampler(spec.sampler_cfg, spec.distributions, seed=int.from_bytes(digest[:4], "little"))


def build_optuna_parts(sweeper: DictConfig, extra: DictConfig, distributions: dict):
    """(sampler, pruner, custom search space hook) from the sweep file, with Hydra's instantiate."""
    sampler = build_sampler(sweeper.sampler, distributions)
    pruner = optuna.pruners.MedianPruner()
    if extra.get("pruner"):
        pruner = instantiate(extra.pruner, _execution_whitelist_=TRUSTED_TARGETS)
    custom = sweeper.get("custom_search_space")
    if custom:
        custom = instantiate({"_target_": custom, "_partial_": True}, _execution_whitelist_=TRUSTED_TARGETS)
    return sampler, pruner, custom


def check_search_space(name: str, source: str, overrides: list[str], task: DictConfig, full: DictConfig,
                       distributions: dict) -> list[DictConfig]:  # fmt: skip
    """Every searched key exists, and the configs at the edges of the space validate; those configs."""
    choices = full.hydra.runtime.choices
    for key in distributions:
        if key not in choices and OmegaConf.select(task, key, default="__missing__") == "__missing__":
            raise SweepError(f"{source}: hydra.sweeper.params: unknown key {key!r}")
    try:
        edges = [validate(task)]
        for key, distribution in distributions.items():
            for value in edge_values(distribution):
                edges.append(validate(compose_config([f"+sweep={name}", *overrides, f"{key}={value}"])))
        return edges
    except ConfigError as error:
        raise SweepError(f"{source}: {error}") from error
    except HydraException as error:
        raise SweepError(f"{source}: {one_line(error)}") from error


def check_sweep_settings(
    source: str, full: DictConfig, extra, distributions: dict, overrides: list[str]
) -> None:
    """The sweep file's own numbers, and no fixed override of a searched key (it would be ignored)."""
    sweeper = full.hydra.sweeper
    direction = getattr(sweeper.direction, "name", sweeper.direction)
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"{source}: hydra.sweeper.direction={direction!r} is not allowed; choose one of "
                         "minimize|maximize (gdlab-sweep runs single-objective studies)")  # fmt: skip
    checks = [
        ("hydra.sweeper.n_trials", sweeper.n_trials, dict(low=1, integer=True)),
        ("gdlab_sweep.report_every", extra.get("report_every", 10), dict(low=1, integer=True)),
        ("gdlab_sweep.max_failure_rate", extra.get("max_failure_rate", 0.5), dict(low=0, high=1)),
    ]
    for key, value, limits in checks:
        try:
            check_number(OmegaConf.create({"value": value}), "value", **limits)
        except ConfigError as error:
            raise SweepError(f"{source}: {str(error).replace('value=', f'{key}=', 1)}") from error
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    for override in parsed:
        if override.key_or_group in distributions and not override.is_sweep_override():
            raise SweepError(
                f"{override.input_line} is ignored: this sweep searches {override.key_or_group} "
                f"({source}: hydra.sweeper.params); drop it, or search another range with "
                f"'hydra.sweeper.params={{{override.key_or_group}:\"...\"}}'"
            )


def check_population_fits(spec: SweepSpec) -> None:
    """A population batch of the sweep's largest configuration fits in this machine's memory."""
    try:
        for cfg in spec.edges:
            where = "--population/gdlab_sweep.population" + (" x members" if spec.members > 1 else "")
            check_fits(cfg, members=spec.population * spec.members, where=f"{where}: ")
    except ConfigError as error:
        raise SweepError(f"{spec.source}: {error}") from error


def one_line(error: Exception) -> str:
    """Hydra's message on one line ("Could not override 'x'. To append to your config use +x=1")."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def edge_values(distribution) -> list:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def search_space_signature(spec: SweepSpec) -> str:
    """What makes trials comparable: the sweep's distributions (custom hooks named, not expanded)."""
    space = {key: repr(distribution) for key, distribution in sorted(spec.distributions.items())}
    if spec.custom_search_space is not None:
        space["custom_search_space"] = getattr(
            spec.custom_search_space, "func", spec.custom_search_space
        ).__name__
    return json.dumps({"sweep": spec.name, "space": space}, sort_keys=True)


def lr_per_optimizer(cfg: DictConfig, trial: optuna.Trial) -> None:
    """custom_search_space: optimizer.lr log-uniform over the chosen optimizer's gdlab_sweep.lr_ranges.

    Sweep files name it `gdlab.sweep.lr_per_optimizer` (the package re-exports it).
    """
    low, high = cfg.gdlab_sweep.lr_ranges[trial.params["optimizer"]]
    trial.suggest_float("optimizer.lr", low, high, log=True)
