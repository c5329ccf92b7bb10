"""gdlab-sweep: run trials of a named sweep (sweeps/NAME.yaml) in-process through Optuna's own API.

The sweep file is the one Hydra's Optuna sweeper reads for `gdlab-train -m +sweep=NAME`; its search
space is parsed by that plugin's own override-to-distribution code. On top of the plugin this adds
pruning, a budget of finished trials across invocations, a per-study lock, heartbeats and retries
for dead trials, and K worker processes on one study.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import optuna
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from gdlab.config import ConfigError, validate
from gdlab.masking import install_log_masking, mask_passwords
from gdlab.sweep_tracking import finish_parent_run, start_parent_run
from gdlab.tracking import PARENT_ENV, TrackingUnavailable, tracking_uri

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STORAGE_ENV = "GDLAB_OPTUNA_STORAGE"
# What a sweep file may instantiate: Optuna's samplers and pruners, and gdlab's search-space hooks.
TRUSTED_TARGETS = ["optuna.samplers.*", "optuna.pruners.*", "gdlab.sweep.*"]
HEARTBEAT_SECONDS = 10  # a worker killed mid-trial is noticed GRACE_SECONDS later
GRACE_SECONDS = 30


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
    pruner: optuna.pruners.BasePruner
    report_every: int
    max_failure_rate: float
    custom_search_space: object | None
    population: int  # trials asked and trained together as one batched model (1: one at a time)
    composer: object = field(default=None, repr=False)  # train.VariantComposer, made on first use


def available_sweeps(config_dir: Path | None = None) -> list[str]:
    """The shipped sweeps (sweeps/), plus those in <config_dir>/sweep/."""
    from importlib.resources import files

    folders = [files("gdlab.conf") / "sweep"] + ([Path(config_dir) / "sweep"] if config_dir else [])
    return sorted({p.name[: -len(".yaml")] for folder in folders if folder.is_dir()
                   for p in folder.iterdir() if p.name.endswith(".yaml")})  # fmt: skip


def search_path_override(config_dir: Path | None) -> list[str]:
    """Hydra's own way to add a config root (as gdlab-train --config-dir DIR does)."""
    return [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []


def compose_trial(name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_module("gdlab.conf"):
        return compose("config", overrides=[f"+sweep={name}", *overrides], return_hydra_config=hydra)


def load_sweep(name: str, overrides: list[str] | None = None, config_dir: Path | None = None) -> SweepSpec:
    """Parse and check a named sweep before any trial runs."""
    overrides = [*search_path_override(config_dir), *(overrides or [])]
    if name not in available_sweeps(config_dir):
        raise SweepError(f"unknown sweep {name!r}; available: {', '.join(available_sweeps(config_dir))}")
    try:
        full = compose_trial(name, overrides, hydra=True)
    except HydraException as error:
        raise SweepError(f"sweeps/{name}.yaml: {error}") from error
    sweeper = full.hydra.sweeper
    task = OmegaConf.create({k: v for k, v in OmegaConf.to_container(full).items() if k != "hydra"})
    space = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    try:
        distributions, fixed_params, _ = create_params_from_overrides(space)
    except Exception as error:
        raise SweepError(f"sweeps/{name}.yaml: hydra.sweeper.params: {error}") from error
    check_search_space(name, overrides, task, full, distributions)
    extra = task.get("gdlab_sweep") or {}
    try:
        sampler, pruner, custom = build_optuna_parts(sweeper, extra, distributions)
    except Exception as error:  # a bad _target_ or argument in the sweep file
        raise SweepError(f"sweeps/{name}.yaml: {str(error).splitlines()[0]}") from error
    population = extra.get("population", 1)
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise SweepError(f"sweeps/{name}.yaml: gdlab_sweep.population={population!r} must be an integer >= 1")
    return SweepSpec(
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
        pruner=pruner,
        report_every=int(extra.get("report_every", 10)),
        max_failure_rate=float(extra.get("max_failure_rate", 0.5)),
        custom_search_space=custom,
        population=population,
    )


def build_optuna_parts(sweeper: DictConfig, extra: DictConfig, distributions: dict):
    """(sampler, pruner, custom search space hook) from the sweep file, with Hydra's instantiate."""
    sampler = instantiate(sweeper.sampler, _execution_whitelist_=TRUSTED_TARGETS)
    if isinstance(sampler, partial):  # GridSampler: its grid comes from the search space
        grid = {k: OptunaSweeperImpl._to_grid_sampler_choices(d) for k, d in distributions.items()}
        sampler = sampler(search_space=grid)
    pruner = optuna.pruners.MedianPruner()
    if extra.get("pruner"):
        pruner = instantiate(extra.pruner, _execution_whitelist_=TRUSTED_TARGETS)
    custom = sweeper.get("custom_search_space")
    if custom:
        custom = instantiate({"_target_": custom, "_partial_": True}, _execution_whitelist_=TRUSTED_TARGETS)
    return sampler, pruner, custom


def check_search_space(name: str, overrides: list[str], task: DictConfig, full: DictConfig,
                       distributions: dict) -> None:  # fmt: skip
    """Every searched key exists, and the configs at the edges of the space validate."""
    choices = full.hydra.runtime.choices
    for key in distributions:
        if key not in choices and OmegaConf.select(task, key, default="__missing__") == "__missing__":
            raise SweepError(f"sweeps/{name}.yaml: hydra.sweeper.params: unknown key {key!r}")
    try:
        validate(task)
        for key, distribution in distributions.items():
            for value in edge_values(distribution):
                validate(compose_trial(name, [*overrides, f"{key}={value}"]))
    except ConfigError as error:
        raise SweepError(f"sweeps/{name}.yaml: {error}") from error
    except HydraException as error:
        raise SweepError(f"sweeps/{name}.yaml: {error}") from error


def edge_values(distribution) -> list:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def suggest(trial: optuna.Trial, name: str, distribution):
    """Draw one value through the public suggest API."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)  # fmt: skip
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                                   log=distribution.log)  # fmt: skip
    raise SweepError(f"unsupported distribution for {name}: {distribution}")


def lr_per_optimizer(cfg: DictConfig, trial: optuna.Trial) -> None:
    """custom_search_space: optimizer.lr log-uniform over the chosen optimizer's gdlab_sweep.lr_ranges."""
    low, high = cfg.gdlab_sweep.lr_ranges[trial.params["optimizer"]]
    trial.suggest_float("optimizer.lr", low, high, log=True)


class PruningReporter:
    """An epoch callback: report the objective every few epochs and stop a hopeless trial."""

    def __init__(self, trial: optuna.Trial, objective: str, every: int):
        self.trial, self.objective, self.every = trial, objective, every

    def __call__(self, row: dict) -> None:
        epoch = row["epoch"]
        if epoch == 0 or epoch % self.every:
            return
        value = row.get(self.objective, math.nan)
        if not math.isfinite(value):
            return  # divergence ends the run itself, as FAIL
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.objective}={value:.4g})")


def suggest_trial(spec: SweepSpec, trial: optuna.Trial) -> tuple[DictConfig, list[str]]:
    """Draw a trial's params; its validated config and the overrides that reproduce it."""
    for key, distribution in spec.distributions.items():
        suggest(trial, key, distribution)
    if spec.custom_search_space is not None:
        spec.custom_search_space(spec.task, trial)
    from gdlab.train import VariantComposer

    base = [f"+sweep={spec.name}", *spec.overrides]
    params = [f"{k}={v}" for k, v in {**trial.params, **spec.fixed_params}.items()]
    if spec.composer is None:
        spec.composer = VariantComposer(base)
    return spec.composer(params), [*base, *params]


def trial_run_args(spec: SweepSpec, trial: optuna.Trial, cfg: DictConfig, output_root: Path) -> dict:
    """What a trial's training run gets: its output directory, pruning reports and MLflow tags."""
    return dict(
        output_dir=output_root / f"trial-{trial.number}",
        epoch_callbacks=[PruningReporter(trial, cfg.objective, spec.report_every)],
        tags={"optuna.study": spec.study_name, "optuna.trial": trial.number},
    )


def record_result(trial: optuna.Trial, result) -> float:
    """Note the run on its trial; the objective (NaN when diverged: the trial FAILs)."""
    if result.final.get("mlflow_run_id"):
        trial.set_user_attr("mlflow_run_id", result.final["mlflow_run_id"])
    if result.final["diverged_at"] is not None:
        trial.set_user_attr("failure", f"loss became NaN/inf at epoch {result.final['diverged_at']}")
    return result.final["objective"]


def make_objective(spec: SweepSpec, output_root: Path):
    from gdlab.train import fit

    def objective(trial: optuna.Trial) -> float:
        cfg, overrides = suggest_trial(spec, trial)
        return record_result(trial, fit(cfg, overrides, **trial_run_args(spec, trial, cfg, output_root)))

    return objective


def run_population_batches(spec: SweepSpec, study: optuna.Study, storage, args, budget: int,
                           logger: TrialLogger) -> None:  # fmt: skip
    """Population mode: ask up to `spec.population` trials, train those that share an architecture as
    one batched model (gdlab.population), tell each trial its own result. Trials whose optimizer cannot
    be batched (adam, lbfgs) run one by one within the batch."""
    output_root = Path("outputs") / "sweeps" / study.study_name
    started, asked = time.monotonic(), 0
    while not logger.stopping:
        if args.timeout is not None and time.monotonic() - started >= args.timeout:
            break
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, and retried as WAITING
        taken = len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
        size = min(spec.population, budget - taken)
        if args.n_trials:
            size = min(size, args.n_trials - asked)
        if size <= 0:
            break
        trials = [study.ask() for _ in range(size)]
        asked += size
        with Heartbeats(storage, trials, args.heartbeat_interval):
            run_trial_batch(spec, study, trials, output_root, logger)


def run_trial_batch(spec: SweepSpec, study: optuna.Study, trials: list, output_root: Path,
                    logger: TrialLogger) -> None:  # fmt: skip
    """Make each trial's config, train the batch population by population, tell every trial."""
    from gdlab.population import POPULATION_OPTIMIZERS, group_by_architecture

    told: list = []

    def tell(trial, value=None, state=None, error: Exception | None = None) -> None:
        if error is not None:
            trial.set_user_attr("failure", f"{type(error).__name__}: {mask_passwords(str(error))}"[:500])
            state = TrialState.FAIL
        elif state is None and not math.isfinite(value):
            state, value = TrialState.FAIL, None
        told.append(tell_study(study, trial, value, state))

    try:
        prepared = []  # (trial, cfg, overrides) of the trials whose config could be made
        for trial in trials:
            try:
                prepared.append((trial, *suggest_trial(spec, trial)))
            except Exception as error:  # e.g. a value the config refuses
                tell(trial, error=error)
        for group in group_by_architecture([cfg for _, cfg, _ in prepared]):
            members = [prepared[i] for i in group]
            if members[0][1].optimizer.name in POPULATION_OPTIMIZERS:
                outcomes = train_together(spec, members, output_root)
            else:
                outcomes = [train_alone(spec, *member, output_root) for member in members]
            for (trial, _, _), (value, state, error) in zip(members, outcomes, strict=True):
                tell(trial, value, state, error)
            logger.log(study, told[-len(members) :])
    finally:  # an interrupt or an unreachable backend: the batch's other trials end FAIL, not RUNNING
        done = {t.number for t in told}
        for trial in trials:
            if trial.number not in done:
                tell_study(study, trial, None, TrialState.FAIL)


def train_together(spec: SweepSpec, members: list, output_root: Path) -> list[tuple]:
    """(value, state, error) of each (trial, cfg, overrides) of one population, trained as one model."""
    from gdlab.train import fit_population

    run_args = [trial_run_args(spec, trial, cfg, output_root) for trial, cfg, _ in members]
    try:
        results = fit_population(
            [cfg for _, cfg, _ in members],
            [overrides for _, _, overrides in members],
            output_dirs=[a["output_dir"] for a in run_args],
            epoch_callbacks=[a["epoch_callbacks"] for a in run_args],
            tags=[{**a["tags"], "gdlab.population": len(members)} for a in run_args],
        )
    except TrackingUnavailable:
        raise
    except Exception as error:  # fails this population's trials only
        return [(None, None, error)] * len(members)
    pruned = (None, TrialState.PRUNED, None)
    return [pruned if result.final["pruned"] else (record_result(trial, result), None, None)
            for (trial, _, _), result in zip(members, results, strict=True)]  # fmt: skip


def train_alone(spec: SweepSpec, trial, cfg: DictConfig, overrides: list[str], output_root: Path) -> tuple:
    """(value, state, error) of a trial whose optimizer has no population form (adam, lbfgs)."""
    from gdlab.train import fit

    try:
        result = fit(cfg, overrides, **trial_run_args(spec, trial, cfg, output_root))
    except optuna.TrialPruned:
        return None, TrialState.PRUNED, None
    except TrackingUnavailable:
        raise
    except Exception as error:
        return None, None, error
    return record_result(trial, result), None, None


def tell_study(study: optuna.Study, trial: optuna.Trial, value, state) -> optuna.trial.FrozenTrial:
    """study.tell, where a GridSampler that has used up its grid may call study.stop(): outside
    study.optimize that raises, after the trial was stored, and there is nothing left to stop."""
    try:
        return study.tell(trial, value, state=state, skip_if_finished=True)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
        return study.get_trials(deepcopy=False)[trial.number]


class Heartbeats:
    """A thread that records a heartbeat for each of a batch's trials (what study.optimize does for one)."""

    def __init__(self, storage, trials: list, interval: float):
        self.storage, self.trials, self.interval = storage, trials, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="gdlab-heartbeats", daemon=True)

    def _beat(self) -> None:
        while True:
            for trial in self.trials:
                self.storage.record_heartbeat(trial._trial_id)  # Optuna's own loop uses the same id
            if self.done.wait(self.interval):
                return

    def __enter__(self):
        if self.storage.get_heartbeat_interval() is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()


class TrialLogger:
    """One log line per finished trial: k/N, state, value, params, best so far. Stops a failing sweep."""

    def __init__(self, budget: int, max_failure_rate: float, out=sys.stdout):
        self.budget, self.max_failure_rate, self.out = budget, max_failure_rate, out
        self.states: list[TrialState] = []
        self.stopping = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.log(study, [trial])  # as an Optuna callback: one trial at a time

    def log(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
        """Log finished trials in order; a population's batch with one storage query for all of them."""
        numbers = {t.number for t in trials}
        earlier = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.number not in numbers]
        finished, best = len(earlier), None
        for trial in [*earlier, *trials]:
            if trial.state == TrialState.COMPLETE and (best is None or self.better(study, trial, best)):
                best = trial
            if trial.number not in numbers:
                continue
            self.states.append(trial.state)
            finished += trial.state in FINISHED
            value = "" if trial.value is None else f" value={trial.value:.6g}"
            reason = trial.user_attrs.get("failure", "")
            reason = f" reason={reason}" if reason else ""
            best_text = "none yet" if best is None else f"{best.value:.6g} (trial {best.number})"
            print(f"trial {finished}/{self.budget} #{trial.number} {trial.state.name}{value} "
                  f"params={trial.params}{reason} best={best_text}", file=self.out, flush=True)  # fmt: skip
        if len(self.states) >= 5 and self.failure_rate > self.max_failure_rate:
            print(f"gdlab-sweep: failure rate {self.failure_rate:.0%} is over {self.max_failure_rate:.0%}; "
                  "stopping", file=self.out, flush=True)  # fmt: skip
            self.stopping = True  # population mode checks this; study.optimize needs study.stop()
            with contextlib.suppress(RuntimeError):  # raised outside study.optimize
                study.stop()

    @staticmethod
    def better(study: optuna.Study, trial, than) -> bool:
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return trial.value > than.value
        return trial.value < than.value

    @property
    def failure_rate(self) -> float:
        return sum(s == TrialState.FAIL for s in self.states) / max(1, len(self.states))


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS):
    """RDB storage with heartbeats: a trial whose process died goes FAIL and is retried (twice)."""
    is_sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite else {"pool_pre_ping": True}
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        check_is_optuna_database(url)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat,
            grace_period=grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    except SweepError:
        raise
    except Exception as error:
        raise SweepError(f"--storage {mask_passwords(url)} is not a usable Optuna database: "
                         f"{mask_passwords(str(error)).splitlines()[0]}") from error  # fmt: skip


def check_is_optuna_database(url: str) -> None:
    """Refuse, before writing anything, a database that holds tables but not Optuna's."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise SweepError(
            f"--storage {mask_passwords(url)} is not an Optuna database (it holds other tables: "
            f"{', '.join(sorted(tables)[:5])}); use an empty database or an existing Optuna one"
        )


def search_space_signature(spec: SweepSpec) -> str:
    """What makes trials comparable: the sweep's distributions (custom hooks named, not expanded)."""
    import json

    space = {key: repr(distribution) for key, distribution in sorted(spec.distributions.items())}
    if spec.custom_search_space is not None:
        space["custom_search_space"] = getattr(
            spec.custom_search_space, "func", spec.custom_search_space
        ).__name__
    return json.dumps({"sweep": spec.name, "space": space}, sort_keys=True)


def check_same_search_space(study: optuna.Study, spec: SweepSpec) -> None:
    signature = search_space_signature(spec)
    stored = study.user_attrs.get("gdlab.search_space")
    if stored is None:
        study.set_user_attr("gdlab.search_space", signature)
    elif stored != signature:
        raise SweepError(
            f"study {study.study_name!r} was created by another search space ({stored}); this "
            f"invocation's is {signature}. Use another --study name instead of mixing incompatible trials."
        )


def repair_killed_runs(task: DictConfig, study: optuna.Study) -> int:
    """End as KILLED the MLflow runs left RUNNING by trials whose process died (their trial is over)."""
    uri = tracking_uri(task)
    if uri is None:
        return 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        return _repair(client, study)
    except Exception as error:  # repairing is housekeeping: it never stops a sweep
        print(f"gdlab-sweep: could not repair MLflow runs: {mask_passwords(str(error)).splitlines()[0]}")
        return 0


def _repair(client, study: optuna.Study) -> int:
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    filter_string = f"tags.`optuna.study` = '{study.study_name}' and attributes.status = 'RUNNING'"
    repaired = 0
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], filter_string=filter_string):
            tags = run.data.tags
            if "optuna.trial" in tags:
                dead = states.get(int(tags["optuna.trial"])) not in (None, TrialState.RUNNING)
                reason = "its worker died; the trial failed by heartbeat"
            else:  # a sweep's parent run: dead if its process, on this host, is gone
                pid = int(tags.get("gdlab.pid", 0))
                dead = tags.get("gdlab.host") == socket.gethostname() and not process_alive(pid)
                reason = "its gdlab-sweep process died"
            if dead:
                client.set_tag(run.info.run_id, "failure.reason", reason)
                client.set_terminated(run.info.run_id, status="KILLED")
                repaired += 1
    return repaired


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class StudyLock:
    """One gdlab-sweep per study on this machine: an exclusive flock on <tracking.dir>/locks/<study>.lock."""

    def __init__(self, directory: Path, study_name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{study_name}.lock"
        self.file = open(self.path, "a+")  # noqa: SIM115 (held for the process's life)

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return True


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="gdlab-sweep", description="Run trials of a named sweep with Optuna."
    )
    parser.add_argument("name", help=f"a sweep in sweeps/ ({', '.join(available_sweeps())})")
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for every trial, e.g. trainer.max_epochs=50"
    )
    parser.add_argument("--n-trials", type=int, help="run at most this many trials in this invocation")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: the sweep's, sqlite:///mlruns/optuna.db)"
    )
    parser.add_argument("--study", help="study name (default: the sweep's)")
    parser.add_argument(
        "--budget", type=int, help="finished trials the study should hold (default: the sweep's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this study (default 1)")
    parser.add_argument(
        "--config-dir", type=Path, help="an extra config root whose sweep/ folder holds more sweeps"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=HEARTBEAT_SECONDS,
        help=f"seconds between a running trial's heartbeats (default {HEARTBEAT_SECONDS})",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=GRACE_SECONDS,
        help=f"seconds without a heartbeat before a trial counts as dead (default {GRACE_SECONDS})",
    )
    parser.add_argument(
        "--population",
        type=int,
        help="trials asked and trained together as one batched model (default: the sweep's "
        "gdlab_sweep.population, else 1: one trial at a time)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parent-run-id", help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_log_masking()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Population mode asks trials itself and records their heartbeats itself (Heartbeats).
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        spec = load_sweep(args.name, args.overrides, args.config_dir)
        study_name, budget = args.study or spec.study_name, args.budget or spec.budget
        storage_url = args.storage or os.environ.get(STORAGE_ENV) or spec.storage
        if args.workers < 1:
            raise SweepError(f"--workers={args.workers} must be >= 1")
        if args.population is not None:
            if args.population < 1:
                raise SweepError(f"--population={args.population} must be >= 1")
            spec.population = args.population
        lock = None if args.worker else StudyLock(Path(spec.task.tracking.dir) / "locks", study_name)
        if lock is not None and not lock.acquire():
            print(f"gdlab-sweep: study {study_name!r} is already being run by another gdlab-sweep on this "
                  f"machine (lock {lock.path}); nothing to do")  # fmt: skip
            return 0
        storage = make_storage(storage_url, args.heartbeat_interval, args.grace_period)
        study = optuna.create_study(
            study_name=study_name, storage=storage, sampler=spec.sampler, pruner=spec.pruner,
            direction=spec.direction, load_if_exists=True,
        )  # fmt: skip
        check_same_search_space(study, spec)
    except (SweepError, ConfigError) as error:
        print(f"gdlab-sweep: error: {error}", file=sys.stderr)
        return 2
    try:
        return run_sweep(args, spec, study, storage, storage_url, budget)
    except TrackingUnavailable as error:
        print(f"gdlab-sweep: error: {error}", file=sys.stderr)
        return 3


def run_sweep(args, spec: SweepSpec, study: optuna.Study, storage, storage_url: str, budget: int) -> int:
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished >= budget:
        print(f"gdlab-sweep: study {study.study_name!r} holds {finished}/{budget} finished trials: "
              "budget reached")  # fmt: skip
        return 0
    print(f"gdlab-sweep: study {study.study_name!r} in {mask_passwords(storage_url)}: "
          f"{finished}/{budget} finished trials", flush=True)  # fmt: skip
    import gdlab.population  # noqa: F401  (torch and Lightning load here, not inside the first trial)
    import gdlab.train  # noqa: F401

    parent_run_id = args.parent_run_id
    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id
    elif tracking_uri(spec.task) is not None:
        parent_run_id = start_parent_run(
            spec.task, name=f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"optuna.study": study.study_name, "optuna.storage": storage_url, "sweep": spec.name,
                  "gdlab.host": socket.gethostname(), "gdlab.pid": os.getpid()},
        )  # fmt: skip
        repair_killed_runs(spec.task, study)
    workers = [start_worker(args, spec, study.study_name, storage_url, budget, parent_run_id)
               for _ in range(args.workers - 1)]  # fmt: skip
    logger = TrialLogger(budget, spec.max_failure_rate)
    if spec.population > 1:
        run_population_batches(spec, study, storage, args, budget, logger)
    else:
        study.optimize(
            make_objective(spec, Path("outputs") / "sweeps" / study.study_name),
            n_trials=args.n_trials,
            timeout=args.timeout,
            callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED), logger],
            catch=(Exception,),
        )
    worker_failed = any(worker.wait() != 0 for worker in workers)
    if not args.worker and parent_run_id:
        repaired = repair_killed_runs(spec.task, study)
        if repaired:
            print(f"gdlab-sweep: ended {repaired} MLflow run(s) left RUNNING by dead processes as KILLED")
        report_dir = (
            Path("outputs") / "sweeps" / study.study_name / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        finish_parent_run(spec.task, parent_run_id, report_dir)
        log_study_plots(spec.task, parent_run_id, study)
    if logger.failure_rate > spec.max_failure_rate or worker_failed:
        print(f"gdlab-sweep: failure rate {logger.failure_rate:.0%} is over {spec.max_failure_rate:.0%}",
              file=sys.stderr)  # fmt: skip
        return 1
    total = len(study.get_trials(deepcopy=False, states=FINISHED))
    try:
        print(f"gdlab-sweep: done: {total}/{budget} finished trials; best {study.best_value:.6g} "
              f"with {study.best_trial.params}")  # fmt: skip
    except ValueError:
        print(f"gdlab-sweep: done: {total}/{budget} finished trials; none completed")
    return 0


def start_worker(
    args, spec: SweepSpec, study_name: str, storage_url: str, budget: int, parent_run_id: str | None
):
    command = [sys.executable, "-m", "gdlab.sweep", args.name, *args.overrides, "--worker",
               *(["--config-dir", str(args.config_dir)] if args.config_dir else []),
               "--study", study_name, "--budget", str(budget),
               "--heartbeat-interval", str(args.heartbeat_interval),
               "--grace-period", str(args.grace_period), "--population", str(spec.population)]  # fmt: skip
    if parent_run_id:
        command += ["--parent-run-id", parent_run_id]
    if args.n_trials:
        command += ["--n-trials", str(args.n_trials)]
    if args.timeout:
        command += ["--timeout", str(args.timeout)]
    # The storage URL (it may hold a password) goes by environment, so `ps` never shows it.
    return subprocess.Popen(command, env={**os.environ, STORAGE_ENV: storage_url})


def log_study_plots(task: DictConfig, parent_run_id: str, study: optuna.Study) -> None:
    """Optuna's own plots, as PNGs on the parent run; a plot that needs more trials is skipped."""
    import tempfile

    import matplotlib.pyplot as plt  # optuna's plots draw through pyplot
    from mlflow import MlflowClient
    from optuna.visualization import matplotlib as plots

    makers = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
        "slice": plots.plot_slice,
        "contour": plots.plot_contour,
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, make in makers.items():
            try:
                make(study)
                plt.gcf().set_size_inches(10, 6)
                plt.savefig(Path(folder) / f"{name}.png", dpi=80, bbox_inches="tight")
            except Exception as error:  # e.g. importances need two completed trials
                print(f"gdlab-sweep: no {name} plot: {str(error).splitlines()[0] if str(error) else error!r}")
            finally:
                plt.close("all")
        client = MlflowClient(tracking_uri=tracking_uri(task))
        client.log_artifacts(parent_run_id, folder, "optuna")


if __name__ == "__main__":
    sys.exit(main())
