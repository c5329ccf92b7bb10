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

import optuna
from omegaconf import DictConfig
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from gdlab.compose import VariantComposer, compose_config
from gdlab.config import validate
from gdlab.data import SPLIT_METRICS
from gdlab.masking import error_line, mask_passwords
from gdlab.members import POPULATION_OPTIMIZERS, Retire, group_by_architecture
from gdlab.progress import Progress
from gdlab.sweep.spec import SweepError, SweepSpec
from gdlab.sweep.study import FINISHED, Heartbeats
from gdlab.tracking import TrackingUnavailable, trial_run_name


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
    base = [f"+sweep={spec.name}", *spec.overrides]
    values = [f"{k}={v}" for k, v in {**params, **spec.fixed_params}.items()]
    if spec.composer is None:
        spec.composer = VariantComposer(base)
    return spec.composer(values), [*base, *values]


def chosen_config(spec: SweepSpec, trial: optuna.trial.FrozenTrial) -> tuple[DictConfig, list[str]]:
    """What the chosen trial trained, to refit: its config, or a PBT member's replay (its schedule)."""
    replay = trial.user_attrs.get("pbt.replay")
    if replay:
        overrides = replay.split()
        return validate(compose_config(overrides)), overrides
    return trial_config(spec, trial.params)


class PruningReporter:
    """An epoch callback: report the objective every few epochs and retire a hopeless trial."""

    def __init__(self, trial: optuna.Trial, objective: str, every: int):
        self.trial, self.objective, self.every = trial, objective, every

    def __call__(self, row: dict) -> None:
        epoch = row["epoch"]
        if epoch == 0 or epoch % self.every:
            return
        value = row.get(self.objective, math.nan)
        if not math.isfinite(value):
            return  # divergence ends the run itself, as FAIL
        try:
            self.trial.report(value, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed by heartbeat while this process stopped
            raise Retire("its trial was failed by heartbeat while its process was stopped") from None
        if self.trial.should_prune():
            raise Retire(f"pruned at epoch {epoch} ({self.objective}={value:.4g})")


def trial_run_args(spec: SweepSpec, trial: optuna.Trial, cfg: DictConfig, output_root: Path) -> dict:
    """What a trial's training run gets: its output directory, pruning reports and MLflow tags."""
    return dict(
        output_dir=output_root / f"trial-{trial.number}",
        epoch_callbacks=[PruningReporter(trial, cfg.objective, spec.report_every)],
        tags={
            "optuna.study": trial.study.study_name,  # --study NAME, not the file's
            "optuna.trial": trial.number,
            "mlflow.runName": trial_run_name(trial.params, trial.number, cfg),
        },  # fmt: skip
    )


def progress_of(spec: SweepSpec, trials: list, cfg: DictConfig) -> Progress | None:
    """Live progress of one trial or one batch (gdlab.progress): a bar on a terminal, else a line every
    spec.progress_every seconds."""
    names = [f"#{trial.number}" for trial in trials]
    label = f"trial {names[0]}" if len(trials) == 1 else f"trials {names[0]}-{names[-1]}"
    return Progress.auto(label, names, cfg.objective, spec.direction, every=spec.progress_every)


def record_result(trial: optuna.Trial, result) -> float:
    """Note the run on its trial, whatever its state (optuna-dashboard shows user attributes); the
    objective (NaN when diverged: the trial FAILs)."""
    if result.final.get("mlflow_run_id"):
        trial.set_user_attr("mlflow_run_id", result.final["mlflow_run_id"])
    trial.set_user_attr("final", {key: result.final[key] for key in SPLIT_METRICS if key in result.final})
    if "pbt_replay" in result.final:  # what replays the weights this trial ends with, and how often it copied
        trial.set_user_attr("pbt.replay", result.final["pbt_replay"])
        trial.set_user_attr("pbt.exploits", result.final["pbt_exploits"])
    if result.final["diverged_at"] is not None and not result.final["pruned"]:
        trial.set_user_attr("failure", f"loss became NaN/inf at epoch {result.final['diverged_at']}")
    if result.final.get("record_error"):  # its record is incomplete: the trial FAILs, with the reason
        trial.set_user_attr("failure", result.final["record_error"])
        return math.nan
    return result.final["objective"]


def run_population_batches(spec: SweepSpec, study: optuna.Study, storage, args, budget: int,
                           logger: TrialLogger) -> None:  # fmt: skip
    """Ask up to `spec.population` trials (1: one at a time), train those that share an architecture as
    one batched model, tell each trial its own result. Trials whose optimizer has no population form
    (not in gdlab.members.POPULATION_OPTIMIZERS) run one by one within the batch."""
    output_root = Path("outputs") / "sweeps" / study.study_name
    started, asked = time.monotonic(), 0
    while not logger.stopping:
        if args.timeout is not None and time.monotonic() - started >= args.timeout:
            break
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, and retried as WAITING
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        size = min(spec.population, budget - finished - running)
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
        try:
            for _ in range(size):
                trials.append(study.ask())
        except BaseException:  # a signal while asking: what was asked ends FAIL, not RUNNING forever
            for trial in trials:
                tell_study(study, trial, None, TrialState.FAIL)
            raise
        asked += size
        with Heartbeats(storage, trials, args.heartbeat_interval):
            run_trial_batch(spec, study, trials, output_root, logger)


def run_trial_batch(spec: SweepSpec, study: optuna.Study, trials: list, output_root: Path,
                    logger: TrialLogger) -> None:  # fmt: skip
    """Make each trial's config, train the batch population by population, tell every trial."""
    told: list = []

    def tell(trial, value=None, state=None, error: Exception | None = None) -> None:
        if state == TAKEN or (error is not None and not still_ours(trial)):  # failed by heartbeat meanwhile
            told.append(study._storage.get_trial(trial._trial_id))
            return
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
            if trial.number not in done and still_ours(trial):
                trial.set_user_attr("failure", "its batch was interrupted")
                tell_study(study, trial, None, TrialState.FAIL)


def train_together(spec: SweepSpec, members: list, output_root: Path) -> list[tuple]:
    """(value, state, error) of each (trial, cfg, overrides) of one population, trained as one model."""
    from gdlab.fit import fit_population

    run_args = [trial_run_args(spec, trial, cfg, output_root) for trial, cfg, _ in members]
    pbt = population_based_training(spec, [trial for trial, _, _ in members], members[0][1])
    try:
        results = fit_population(
            [cfg for _, cfg, _ in members],
            [overrides for _, _, overrides in members],
            output_dirs=[a["output_dir"] for a in run_args],
            epoch_callbacks=[a["epoch_callbacks"] for a in run_args],
            tags=[{**a["tags"], "gdlab.population": len(members)} for a in run_args],
            progress=progress_of(spec, [trial for trial, _, _ in members], members[0][1]),
            pbt=pbt,
        )
    except TrackingUnavailable:
        raise
    except Exception as error:  # fails this population's trials only
        return [(None, None, error)] * len(members)
    outcomes, running = [], running_trial_ids(members[0][0].study)  # one storage query for the population
    for (trial, _, _), result in zip(members, results, strict=True):
        if taken_from_us(trial, result, running):
            outcomes.append((None, TAKEN, None))
            continue
        value = record_result(trial, result)
        outcomes.append((None, TrialState.PRUNED, None) if result.final["pruned"] else (value, None, None))
    return outcomes


TAKEN = "taken"  # an outcome: the trial was failed by heartbeat meanwhile, and retried by another process


def still_ours(trial: optuna.Trial) -> bool:
    """Whether the trial is still RUNNING in the storage (not failed by heartbeat by another process)."""
    return trial._trial_id in running_trial_ids(trial.study)


def running_trial_ids(study: optuna.Study) -> set[int]:
    return {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def taken_from_us(trial: optuna.Trial, result, running: set[int] | None = None) -> bool:
    """Whether another process failed this trial by heartbeat while this one was stopped (`running`: the
    study's RUNNING trial ids, if known); then its run ends KILLED with the reason, and one line says so
    (its retry is another trial)."""
    if trial._trial_id in (running if running is not None else running_trial_ids(trial.study)):
        return False
    reason = (f"trial #{trial.number} was failed by heartbeat while its process was stopped (it is retried "
              "as another trial)")  # fmt: skip
    run_id = result.final.get("mlflow_run_id")
    if run_id:
        from gdlab.tracking import mlflow_client, tracking_uri

        try:
            client = mlflow_client(tracking_uri(result.config))
            client.set_tag(run_id, "failure.reason", reason)
            client.set_terminated(run_id, status="KILLED")
        except Exception as error:  # the store's outage: the line below still says what happened
            reason += f"; its run could not be ended: {error_line(error)}"
    print(
        f"gdlab-sweep: {reason}; its run ended KILLED, going on with new trials", file=sys.stderr, flush=True
    )
    return True


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
    """(value, state, error) of a trial whose optimizer has no population form."""
    from gdlab.fit import fit

    try:
        result = fit(cfg, overrides, **trial_run_args(spec, trial, cfg, output_root),
                     progress=progress_of(spec, [trial], cfg))  # fmt: skip
    except TrackingUnavailable:
        raise
    except Exception as error:
        return None, None, error
    if taken_from_us(trial, result):
        return None, TAKEN, None
    value = record_result(trial, result)
    if result.final["pruned"]:
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
        self.states: list[TrialState] = []
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
