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


class PruningReporter:
    """A trial's pruning, over its members (its replicates; one member without): each member's row is an
    epoch callback (`row_callback`); once an epoch, after every row (`epoch_end`, a
    gdlab.module.GroupCallback), the aggregate of the objective over the members that reported is reported
    every few epochs, and when the pruner says so all of `members` retire. Optuna's WilcoxonPruner is
    made for per-instance values: with it, each member's objective is reported instead, at step
    epoch x members + its position (an instance: one fold and seed at one epoch, paired across trials)."""

    def __init__(self, trial: optuna.Trial, objective: str, every: int, members: Sequence[int] = (0,),
                 aggregate: str = "mean", direction: str = "minimize"):  # fmt: skip
        self.trial, self.objective, self.every = trial, objective, every
        self.members, self.how, self.direction = list(members), aggregate, direction
        self.values: dict[int, float] = {}  # this epoch's objective of each member that reported

    def row_callback(self, member: int) -> Callable[[dict], None]:
        def take(row: dict) -> None:
            self.values[member] = row.get(self.objective, math.nan)

        return take

    def epoch_end(self, epoch: int) -> None:
        reported, self.values = {m: v for m, v in self.values.items() if math.isfinite(v)}, {}
        if epoch == 0 or epoch % self.every or not reported:
            return  # divergence ends a member itself, as FAIL
        value = aggregate(list(reported.values()), self.how, self.direction)
        try:
            if isinstance(self.trial.study.pruner, optuna.pruners.WilcoxonPruner):
                # Wilcoxon pairs instances across trials: each member (fold, seed) at this epoch is one
                order = {member: i for i, member in enumerate(self.members)}
                for member, member_value in reported.items():
                    self.trial.report(member_value, epoch * len(self.members) + order[member])
            else:
                self.trial.report(value, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed by heartbeat while this process stopped
            raise Retire("its trial was failed by heartbeat while its process was stopped") from None
        if self.trial.should_prune():
            raise Retire(f"pruned at epoch {epoch} ({self.objective}={value:.4g})")


def group_reporters(spec: SweepSpec, members: list, group: list[int]) -> list[PruningReporter]:
    """Each trial's pruning reporter over its replicates in `group` (population indices), by their indices
    within the group; a trial whose replicates train apart (mini-batch seeds) is reported by none: it
    trains to its end."""
    k, where = spec.members, {p: local for local, p in enumerate(group)}
    reporters = []
    for i, (trial, cfg, _) in enumerate(members):
        mine = [where.get(i * k + r) for r in range(k)]
        if None not in mine:
            reporters.append(PruningReporter(trial, cfg.objective, spec.report_every, mine, spec.aggregate,
                                             spec.direction))  # fmt: skip
    return reporters
