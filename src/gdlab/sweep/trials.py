"""Trials: draw a trial's config, train it (alone, or with others as one population), tell Optuna.

One way to run a study's trials, `run_population_batches`: ask a batch (one trial at a time is a batch
of one), train those that share an architecture as one batched model, tell each. Training itself is
gdlab.fit's; an epoch callback here reports to Optuna's pruner and retires a hopeless trial with
gdlab.members.Retire, which this layer turns back into Optuna's PRUNED. A trial that another process failed
by heartbeat while this one was stopped (SIGSTOP, a suspended job) is no longer this process's to tell
(`taken_from_us`): its run ends KILLED and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from gdlab.compose import compose_config
from gdlab.config import validate
from gdlab.data import SPLIT_METRICS
from gdlab.interrupts import deferred
from gdlab.masking import mask_passwords
from gdlab.members import POPULATION_OPTIMIZERS, group_by_architecture
from gdlab.population import Population, PopulationComposer, as_overrides
from gdlab.progress import Progress
from gdlab.replicates import aggregate, summarize
from gdlab.sweep.first_batch import say_drawn_blind
from gdlab.sweep.pruning import PruningReporter, group_reporters
from gdlab.sweep.spec import SweepError, SweepSpec
from gdlab.sweep.study import FINISHED, Heartbeats
from gdlab.sweep.taken_trials import TAKEN, running_trial_ids, say_taken, still_ours, taken_from_us
from gdlab.sweep.trial_attrs import set_user_attrs, tell_trials
from gdlab.sweep.trial_runs import finish_trial_run, start_trial_runs, wait_for_trial_runs
from gdlab.tracking import TrackingUnavailable, trial_run_name

if TYPE_CHECKING:
    from gdlab.record import PendingRecords


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


def suggest_trial(spec: SweepSpec, trial: optuna.Trial) -> tuple[DictConfig, list[str]]:
    """Draw a trial's params; its validated config and the overrides that reproduce it."""
    for key, distribution in spec.distributions.items():
        suggest(trial, key, distribution)
    if spec.custom_search_space is not None:
        spec.custom_search_space(spec.task, trial)
    return trial_config(spec, trial.params)


def trial_config(spec: SweepSpec, params: dict) -> tuple[DictConfig, list[str]]:
    """The validated config of a trial with these params, and the overrides that reproduce it."""
    base, member = [f"+sweep={spec.name}", *spec.overrides], {**params, **spec.fixed_params}
    if spec.composer is None:
        spec.composer = PopulationComposer(base)
    cfg = spec.composer.config(member)
    # a trial logs no model (the refit does) and no system metrics (its sweep's parent run may)
    cfg.tracking.log_model, cfg.tracking.registered_model, cfg.tracking.system_metrics = False, None, False
    return cfg, [*base, *as_overrides(member)]


def chosen_config(spec: SweepSpec, trial: optuna.trial.FrozenTrial) -> tuple[DictConfig, list[str]]:
    """What the chosen trial trained, to refit: its config, or a PBT member's replay (its schedule)."""
    replay = trial.user_attrs.get("pbt.replay")
    if replay:
        overrides = replay.split()
        return validate(compose_config(overrides)), overrides
    return trial_config(spec, trial.params)


def member_slots(spec: SweepSpec) -> list[tuple[int | None, int | None]]:
    """(fold, replicate) of each of a trial's members, in member order (fold by fold); None where the
    sweep has no folds (gdlab_sweep.cv_folds) or no replicates (gdlab_sweep.replicates)."""
    folds = range(spec.cv_folds) if spec.cv_folds > 1 else [None]
    replicates = range(spec.replicates) if spec.replicates > 1 else [None]
    return [(fold, replicate) for fold in folds for replicate in replicates]


def trial_run_args(spec: SweepSpec, trial: optuna.Trial, cfg: DictConfig, output_root: Path,
                   fold: int | None = None, replicate: int | None = None) -> dict:  # fmt: skip
    """What a trial's training run (or one of its members') gets: its output directory and MLflow tags."""
    name = trial_run_name(trial.params, trial.number, cfg)
    tags = {"optuna.study": trial.study.study_name, "optuna.trial": trial.number}  # --study NAME
    directory = output_root / f"trial-{trial.number}"
    if fold is not None:
        tags["fold"] = fold
        name, directory = f"{name} f{fold}", directory / f"fold-{fold}"
    if replicate is not None:
        tags.update({"replicate": replicate, "seed": cfg.seed + replicate})
        name, directory = f"{name} r{replicate}", directory / f"replicate-{replicate}"
    return dict(output_dir=directory, tags={**tags, "mlflow.runName": name})


def progress_of(spec: SweepSpec, trials: list, cfg: DictConfig) -> Progress | None:
    """Live progress of one trial or one batch (gdlab.progress): a bar on a terminal, else a line every
    spec.progress_every seconds."""
    names = [f"#{trial.number}" for trial in trials]
    label = f"trial {names[0]}" if len(trials) == 1 else f"trials {names[0]}-{names[-1]}"
    return Progress.auto(label, names, cfg.objective, spec.direction, every=spec.progress_every)


def record_result(trial: optuna.Trial, results: list, spec: SweepSpec, seeds: list[int]) -> float:
    """Note the trial's runs on it, whatever its state (optuna-dashboard shows user attributes); its value
    (`result_attrs`)."""
    attrs, value = result_attrs(results, spec, seeds)
    set_user_attrs(trial.study, {trial: attrs})
    return value


def result_attrs(results: list, spec: SweepSpec, seeds: list[int]) -> tuple[dict, float]:
    """What a trial notes of its runs (its user attributes), and its value: its one run's objective, or the
    aggregate of its members' (folds and replicates: NaN when one diverged, and the trial FAILs)."""
    first, attrs = results[0], {}
    if first.final.get("mlflow_run_id"):
        attrs["mlflow_run_id"] = first.final["mlflow_run_id"]
    keys = [key for key in (*SPLIT_METRICS, "epochs") if key in first.final]  # epochs: its model's step
    attrs["final"] = {key: float(np.mean([result.final[key] for result in results])) for key in keys}
    if "pbt_replay" in first.final:  # what replays the weights this trial ends with, and how often it copied
        attrs["pbt.replay"], attrs["pbt.exploits"] = first.final["pbt_replay"], first.final["pbt_exploits"]
    objectives = [result.final["objective"] for result in results]
    slots = member_slots(spec)[: len(results)]  # a member-by-member trial stops at its pruned member
    if len(results) > 1:
        folds = [fold for fold, _ in slots]
        attrs["members"] = {"folds": folds, "seeds": seeds, "aggregate": spec.aggregate,
                            **summarize(objectives).as_dict()}  # fmt: skip
        attrs["mlflow_run_ids"] = [r.final.get("mlflow_run_id") for r in results]
    for (fold, _), seed, result in zip(slots, seeds, results, strict=True):
        which = f"member fold={fold} seed={seed}: " if len(results) > 1 else ""
        diverged_at = result.final["diverged_at"]
        if diverged_at is not None and not result.final["pruned"]:
            attrs["failure"] = f"{which}loss became NaN/inf at epoch {diverged_at}"
        if result.final.get("record_error"):  # its record is incomplete: the trial FAILs, with the reason
            attrs["failure"] = f"{which}{result.final['record_error']}"
            return attrs, math.nan
    return attrs, aggregate(objectives, spec.aggregate, spec.direction)


def run_population_batches(spec: SweepSpec, study: optuna.Study, storage, args, budget: int,
                           logger: TrialLogger) -> None:  # fmt: skip
    """Ask up to `spec.population` trials (1: one at a time), train those that share an architecture as one
    batched model, tell each its own result (those without a population optimizer run one by one)."""
    output_root = Path("outputs") / "sweeps" / study.study_name
    started, asked = time.monotonic(), 0
    while not logger.stopping:
        if args.timeout is not None and time.monotonic() - started >= args.timeout:
            break
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, and retried as WAITING
        # One read for both counts: between two, another process's trial could leave RUNNING unseen by both.
        now = [t.state for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))]
        finished, running = sum(state in FINISHED for state in now), now.count(TrialState.RUNNING)
        size = batch_size(spec.population, budget - finished, running, args.processes or args.workers)
        if args.n_trials:
            size = min(size, args.n_trials - asked)
        if size <= 0:
            if finished >= budget or running == 0 or (args.n_trials and asked >= args.n_trials):
                break
            # Other processes' trials would fill the budget. Wait for them: a stopped or dead one's trial
            # goes FAIL after the grace period (fail_stale_trials above) and its retry is this process's.
            time.sleep(min(args.heartbeat_interval, 5))
            continue
        trials = []
        try:  # a signal while asking: what was asked ends FAIL, not RUNNING (without a heartbeat) for good
            for _ in range(size):
                with deferred():  # a signal inside an ask comes once its trial, made RUNNING, is held here
                    trials.append(study.ask())
            asked += size
            if size > 1 and finished == 0:
                say_drawn_blind(study.sampler, trials)
        except BaseException:
            for trial in trials:
                tell_study(study, trial, None, TrialState.FAIL)
            raise
        with Heartbeats(storage, trials, args.heartbeat_interval):
            run_trial_batch(spec, study, trials, output_root, logger)


def batch_size(population: int, left: int, running: int, processes: int) -> int:
    """How many trials a process asks now: a population batch, at most what the budget leaves (`left`
    finished trials to go, `running` of them under way), and at most an even share of what is left among
    the invocation's `processes` (--workers), so that with a small budget, or at its end, the first
    process to ask does not take everything while the others wait."""
    return min(population, left - running, -(-left // max(processes, 1)))


def run_trial_batch(spec: SweepSpec, study: optuna.Study, trials: list, output_root: Path,
                    logger: TrialLogger) -> None:  # fmt: skip
    """Make each trial's config, train the batch population by population, tell every trial."""
    from gdlab.record import PendingRecords

    told: list = []
    records = PendingRecords()  # the batch's runs, written by the writer process while Optuna is told

    def tell(outcomes: list[tuple]) -> None:
        """Each (trial, value, state, error) told, in that order; those Optuna is told, together."""
        done, plain = {}, []
        for trial, value, state, error in outcomes:
            if state == TAKEN or (error is not None and not still_ours(trial)):  # failed by heartbeat
                if state != TAKEN:  # before its run was made (stopped between its ask and its training)
                    say_taken(trial)
                done[trial.number] = study._storage.get_trial(trial._trial_id)
                logger.taken.add(trial.number)
                continue
            if error is not None:
                trial.set_user_attr("failure", f"{type(error).__name__}: {mask_passwords(str(error))}"[:500])
                state = TrialState.FAIL
            elif state is None and not math.isfinite(value):
                state, value = TrialState.FAIL, None
            plain.append((trial, value, state))
        together = tell_trials(study, plain) or [tell_study(study, *outcome) for outcome in plain]
        done |= {frozen.number: frozen for frozen in together}
        told.extend(done[trial.number] for trial, *_ in outcomes)

    try:
        prepared = []  # (trial, cfg, overrides) of the trials whose config could be made
        for trial in trials:
            try:
                prepared.append((trial, *suggest_trial(spec, trial)))
            except Exception as error:  # e.g. a value the config refuses
                tell([(trial, None, None, error)])
        for group in group_by_architecture([cfg for _, cfg, _ in prepared]):
            members = [prepared[i] for i in group]
            if members[0][1].optimizer.name in POPULATION_OPTIMIZERS:
                outcomes = train_together(spec, members, output_root, records)
            else:
                outcomes = [train_alone(spec, *member, output_root) for member in members]
            tell([(trial, *outcome) for (trial, _, _), outcome in zip(members, outcomes, strict=True)])
            logger.log(study, told[-len(members) :])
            records.finish()
    finally:  # an interrupt or an unreachable backend: the batch's other trials end FAIL, not RUNNING
        try:
            done = {t.number for t in told}
            for trial in trials:
                if trial.number not in done and still_ours(trial):
                    trial.set_user_attr("failure", "its batch was interrupted")
                    tell_study(study, trial, None, TrialState.FAIL)
        finally:  # then the records the writer holds (ended already; a dead writer's are written here)
            records.finish()


def train_together(spec: SweepSpec, members: list, output_root: Path, records: PendingRecords) -> list[tuple]:
    """(value, state, error) of each (trial, cfg, overrides) of one population, trained as one model: with
    replicates, each trial's k seeds are k consecutive members (`Population.replicated`). The members' runs
    go to `records`, their writing waited for by the caller."""
    from gdlab.fit import fit_population

    k, slots, trials = spec.members, member_slots(spec), [trial for trial, _, _ in members]
    cfgs, overrides = [cfg for _, cfg, _ in members], [overrides for _, _, overrides in members]
    population = Population.from_configs(cfgs, overrides)
    if spec.cv_folds > 1:
        population = population.folded(spec.cv_folds)
    population = population.replicated(spec.replicates)
    run_args = [trial_run_args(spec, trial, cfg, output_root, fold, replicate)
                for trial, cfg, _ in members for fold, replicate in slots]  # fmt: skip
    trial_runs = start_trial_runs(cfgs, trials, k) if k > 1 else None  # members nest under their trial's
    for p, args in enumerate(run_args if trial_runs else ()):
        args["tags"]["mlflow.parentRunId"] = trial_runs[p // k]
    pbt = population_based_training(spec, trials, members[0][1])
    results: list = [None] * len(population)
    try:
        for group in population.architecture_groups():  # one, unless mini-batch seeds split replicates
            part = population.subset(group)
            reporters = group_reporters(spec, members, group)
            callbacks = [[] for _ in group]
            for reporter in reporters:
                for local in reporter.members:
                    callbacks[local].append(reporter.row_callback(local))
            trained = fit_population(
                part,
                output_dirs=[run_args[p]["output_dir"] for p in group],
                epoch_callbacks=callbacks,
                tags=[{**run_args[p]["tags"], "gdlab.population": len(group)} for p in group],
                progress=progress_of(spec, sorted({trials[p // k] for p in group}, key=lambda t: t.number),
                                     members[0][1]),
                pbt=pbt,
                group_callbacks=reporters,
                record_later=records,
            )  # fmt: skip
            for p, result in zip(group, trained, strict=True):
                results[p] = result
    except TrackingUnavailable:
        raise
    except Exception as error:  # fails this population's trials only
        end_trial_runs(cfgs, trial_runs, "FAIL")
        return [(None, None, error)] * len(members)
    except BaseException:  # a signal: the trials' own runs end KILLED, as their members' do
        end_trial_runs(cfgs, trial_runs, "KILLED")
        raise
    seeds = population.values("seed")
    outcomes, running = [], running_trial_ids(trials[0].study)  # one storage query for the population
    if any(trial._trial_id not in running for trial in trials):  # taken (rare): their runs end KILLED below,
        records.finish()  # after the writer has ended them FINISHED with their record, not before
    attrs_by_trial = {}  # written in one transaction (gdlab.sweep.trial_attrs)
    for i, trial in enumerate(trials):
        mine = results[i * k : (i + 1) * k]
        if taken_from_us(trial, mine, running):
            outcomes.append((None, TAKEN, None))
            if trial_runs:
                finish_trial_run(cfgs[i], trial_runs[i], mine, None, "KILLED")
            continue
        attrs_by_trial[trial], value = result_attrs(mine, spec, seeds[i * k : (i + 1) * k])
        pruned = any(result.final["pruned"] for result in mine)
        outcomes.append((None, TrialState.PRUNED, None) if pruned else (value, None, None))
        if trial_runs:
            attrs_by_trial[trial]["mlflow_run_id"] = trial_runs[i]
            state = "PRUNED" if pruned else ("COMPLETE" if math.isfinite(value) else "FAIL")
            finish_trial_run(cfgs[i], trial_runs[i], mine, None if pruned else value, state)
    set_user_attrs(trials[0].study, attrs_by_trial)
    if trial_runs:
        wait_for_trial_runs(cfgs[0], trial_runs)
    return outcomes


def end_trial_runs(cfgs: list[DictConfig], trial_runs: list[str] | None, state: str) -> None:
    for cfg, run_id in zip(cfgs, trial_runs or (), strict=False):
        finish_trial_run(cfg, run_id, [], None, state)


def population_based_training(spec: SweepSpec, trials: list, cfg: DictConfig):
    """The sweep's PBT for one population (None without gdlab_sweep.pbt). Each population of a study
    draws its own exploits: its seed is pbt.seed plus its first trial's number (a new study's first
    population uses pbt.seed itself). A population of one trains without PBT, and says so."""
    if spec.pbt is None:
        return None
    if len(trials) < 2:  # the budget's last trial: nobody to copy from
        print(f"gdlab-sweep: trial #{trials[0].number} trains alone, without PBT (the budget left a "
              "population of 1); its value is a fixed-hyperparameter run's", file=sys.stderr)  # fmt: skip
        return None
    from gdlab.pbt import PopulationBasedTraining

    settings = dataclasses.replace(spec.pbt, seed=spec.pbt.seed + trials[0].number)
    return PopulationBasedTraining(settings, cfg.objective, spec.direction, len(trials))


def train_alone(spec: SweepSpec, trial, cfg: DictConfig, overrides: list[str], output_root: Path) -> tuple:
    """(value, state, error) of a trial whose optimizer has no population form; its members (folds,
    replicates), if any, train one after another, without pruning (no one of them is the trial's value)."""
    from gdlab.fit import fit

    slots, results, seeds = member_slots(spec), [], []
    try:
        for fold, replicate in slots:
            member, member_overrides = cfg, list(overrides)
            if len(slots) > 1:
                member = OmegaConf.create(OmegaConf.to_container(cfg))
                if fold is not None:
                    member.dataset.cv_fold = fold
                    member_overrides.append(f"dataset.cv_fold={fold}")
                if replicate is not None:
                    member.seed = cfg.seed + replicate
                    member_overrides.append(f"seed={member.seed}")
            reporter = PruningReporter(trial, cfg.objective, spec.report_every) if len(slots) == 1 else None
            args = trial_run_args(spec, trial, cfg, output_root, fold, replicate)
            results.append(fit(member, member_overrides, **args, progress=progress_of(spec, [trial], cfg),
                               epoch_callbacks=[reporter.row_callback(0)] if reporter else (),
                               group_callbacks=[reporter] if reporter else ()))  # fmt: skip
            seeds.append(member.seed)
            if results[-1].final["pruned"]:
                break
    except TrackingUnavailable:
        raise
    except Exception as error:
        return None, None, error
    if taken_from_us(trial, results):
        return None, TAKEN, None
    value = record_result(trial, results, spec, seeds)
    if any(result.final["pruned"] for result in results):
        return None, TrialState.PRUNED, None
    return value, None, None


def tell_study(study: optuna.Study, trial: optuna.Trial, value, state) -> optuna.trial.FrozenTrial:
    """study.tell, where a GridSampler that has used up its grid may call study.stop(): outside
    study.optimize that raises, after the trial was stored, and there is nothing left to stop."""
    try:
        return study.tell(trial, value, state=state, skip_if_finished=True)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
        return study.get_trials(deepcopy=False)[trial.number]


class TrialLogger:
    """One log line per finished trial: k/N, state, value, params, best so far. Stops a failing sweep."""

    def __init__(self, budget: int, max_failure_rate: float, out=sys.stdout):
        self.budget, self.max_failure_rate, self.out = budget, max_failure_rate, out
        self.states: list[TrialState] = []  # of this process' trials, for the failure rate
        self.taken: set[int] = set()  # failed by heartbeat while this process was stopped: retried elsewhere
        self.stopping = False

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
            if trial.number not in self.taken:
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
            self.stopping = True  # run_population_batches checks this

    @staticmethod
    def better(study: optuna.Study, trial, than) -> bool:
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return trial.value > than.value
        return trial.value < than.value

    @property
    def failure_rate(self) -> float:
        return sum(s == TrialState.FAIL for s in self.states) / max(1, len(self.states))
