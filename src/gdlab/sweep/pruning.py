"""A trial's pruning in a population: its members' rows become one value (or, for Optuna's WilcoxonPruner, one
instance each) reported to its Optuna trial once an epoch, and all its members retire when the pruner says
so (gdlab.members.Retire, which gdlab.sweep.trials turns back into Optuna's PRUNED)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import optuna

from gdlab.members import Retire
from gdlab.replicates import aggregate
from gdlab.sweep.spec import SweepSpec
from gdlab.sweep.trial_attrs import report_values


class PruningReporter:
    """A trial's pruning, over its members (its replicates; one member without): each member's row is an
    epoch callback (`row_callback`); once an epoch, after every row (`epoch_end`, a
    gdlab.module.GroupCallback), the aggregate of the objective over the members that reported is reported
    every few epochs, and when the pruner says so all of `members` retire. Optuna's WilcoxonPruner is
    made for per-instance values: with it, each member's objective is reported instead, at step
    epoch x members + its position (an instance: one fold and seed at one epoch, paired across trials).
    A batch's reporters share their `EpochReports`: each epoch's values of every trial written at once."""

    def __init__(self, trial: optuna.Trial, objective: str, every: int, members: Sequence[int] = (0,),
                 aggregate: str = "mean", direction: str = "minimize"):  # fmt: skip
        self.trial, self.objective, self.every = trial, objective, every
        self.members, self.how, self.direction = list(members), aggregate, direction
        self.values: dict[int, float] = {}  # this epoch's objective of each member that reported
        self.batch: EpochReports | None = None

    def row_callback(self, member: int) -> Callable[[dict], None]:
        def take(row: dict) -> None:
            self.values[member] = row.get(self.objective, math.nan)

        return take

    def due(self, epoch: int) -> tuple[float, list[tuple[int, float]]] | None:
        """This epoch's report, if one is due: the aggregate over the members that reported, and the
        (step, value) pairs to report."""
        reported = {m: v for m, v in self.values.items() if math.isfinite(v)}
        if epoch == 0 or epoch % self.every or not reported:
            return None  # divergence ends a member itself, as FAIL
        value = aggregate(list(reported.values()), self.how, self.direction)
        if isinstance(self.trial.study.pruner, optuna.pruners.WilcoxonPruner):
            # Wilcoxon pairs instances across trials: each member (fold, seed) at this epoch is one
            order = {member: i for i, member in enumerate(self.members)}
            return value, [(epoch * len(self.members) + order[m], v) for m, v in reported.items()]
        return value, [(epoch, value)]

    def epoch_end(self, epoch: int) -> None:
        try:  # the batch's write reads every reporter's values of this epoch, this one's too
            due = self.due(epoch)
            written = due is not None and self.batch is not None and self.batch.written(self.trial, epoch)
        finally:
            self.values = {}
        if due is None:
            return
        value, reports = due
        try:
            if not written:
                for step, reported in reports:
                    self.trial.report(reported, step)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed by heartbeat while this process stopped
            raise Retire("its trial was failed by heartbeat while its process was stopped") from None
        if self.trial.should_prune():
            raise Retire(f"pruned at epoch {epoch} ({self.objective}={value:.4g})")


class EpochReports:
    """A batch's reporters' values of one epoch, written in one storage transaction
    (gdlab.sweep.trial_attrs.report_values) when the first of them ends the epoch: every member's row is in
    by then (gdlab.module runs the rows' callbacks before the group callbacks). Each trial's pruning decision
    stays its own, in order: Optuna's pruners weigh a trial against other trials' finished values or their
    own rung attributes, which a running trial's reported value does not change."""

    def __init__(self, reporters: Sequence[PruningReporter]):
        self.reporters, self.epoch, self.trials = list(reporters), None, set()

    def written(self, trial: optuna.Trial, epoch: int) -> bool:
        """Whether `trial`'s values of `epoch` are written (else its reporter reports them itself)."""
        if epoch != self.epoch:
            due = {reporter.trial: reporter.due(epoch) for reporter in self.reporters}
            reports = {due_trial: report[1] for due_trial, report in due.items() if report is not None}
            self.trials = report_values(trial.study, reports) if reports else set()
            self.epoch = epoch
        return trial in self.trials


def group_reporters(spec: SweepSpec, members: list, group: list[int]) -> list[PruningReporter]:
    """Each trial's pruning reporter over its replicates in `group` (population indices), by their indices
    within the group, sharing their epochs' writes; a trial whose replicates train apart (mini-batch seeds)
    is reported by none: it trains to its end."""
    k, where = spec.members, {p: local for local, p in enumerate(group)}
    reporters = []
    for i, (trial, cfg, _) in enumerate(members):
        mine = [where.get(i * k + r) for r in range(k)]
        if None not in mine:
            reporters.append(PruningReporter(trial, cfg.objective, spec.report_every, mine, spec.aggregate,
                                             spec.direction))  # fmt: skip
    batch = EpochReports(reporters)
    for reporter in reporters:
        reporter.batch = batch
    return reporters
