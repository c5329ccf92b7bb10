"""Population Based Training inside one batched model (Jaderberg et al. 2017; Ray Tune's PBT: the reference).

A population (gdlab.module.TrainingModule) trains P members as one stacked model. Every `interval`
epochs this Lightning callback ranks the members still training by the objective of their last history
row. Each member of the bottom `fraction`, and every member that diverged since, copies a member of the
top `fraction` chosen at random (seeded): weights, gradients, optimizer state and evaluation counts, in
place (`TrainingModule.copy_member`). Then it explores: each hyperparameter is resampled from the search
space with probability `resample_probability`, else the donor's value is multiplied by one of `perturb`,
and either way kept inside the search space's bounds.

The record: every exploit is an `ExploitEvent`, and each member has a lineage (whose slot trained the
weights it holds, over which epochs). `lineage_rows` stitches the history of the weights a member ends
with, and `schedule` reads the hyperparameters of that history as a piecewise-constant schedule, which
a single run replays with optimizer.<number>_schedule (`replay_overrides`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import pytorch_lightning as pl
import torch

from gdlab.pbt_rules import PBTSettings, explore, quantile_size, ranked
from gdlab.schedules import SCHEDULE_SUFFIX


@dataclass
class ExploitEvent:
    """Member `member` took member `donor`'s weights and state, and these values, from epoch `epoch` on."""

    epoch: int
    member: int
    donor: int
    old: dict[str, float]  # the member's values before
    new: dict[str, float]  # after explore
    how: dict[str, str]  # per value: "x1.2", "x0.8" or "resampled"
    reason: str


@dataclass(frozen=True)
class Segment:
    """Part of a lineage: from epoch `start` on, member `member`'s slot trained the weights."""

    start: int
    member: int


class PopulationBasedTraining(pl.Callback):
    """Exploit and explore between epochs of one population; see the module docstring."""

    def __init__(self, settings: PBTSettings, objective: str, direction: str, n_members: int):
        self.settings, self.objective, self.direction = settings, objective, direction
        self.rng = random.Random(settings.seed)
        self.events: list[ExploitEvent] = []
        self.lineages = [[Segment(0, p)] for p in range(n_members)]

    def on_train_epoch_start(self, trainer: pl.Trainer, module) -> None:
        # Lightning runs the callbacks' on_train_epoch_start before the module's, so everything the
        # module measures for this epoch (its history row) is measured at the copied weights.
        epoch = trainer.current_epoch
        if epoch and epoch % self.settings.interval == 0:
            self.exploit_and_explore(module, epoch)

    def exploit_and_explore(self, module, epoch: int) -> None:
        """One round: every copy at once (module.copy_members), the numbers explored on the host from one
        transfer per number, whatever the population's size."""
        optimizer = module.optimizers().optimizer
        numbers = {number: optimizer.number(number) for number in self.settings.numbers}
        values = {number: v.cpu().tolist() for number, v in numbers.items()}
        sources, targets = [], []
        for member, donor, reason in self.copies(module, epoch):
            old = {key: values[number][member] for key, number in self.keys()}
            new, how = {}, {}
            for key, number in self.keys():
                space = self.settings.hyperparameters[key]
                new[key], how[key] = explore(values[number][donor], space, self.settings, self.rng)
            for key, number in self.keys():
                values[number][member] = new[key]
            sources.append(donor)
            targets.append(member)
            self.lineages[member] = [*self.lineages[donor], Segment(epoch, member)]
            self.events.append(ExploitEvent(epoch, member, donor, old, new, how, reason))
        if not targets:
            return
        module.copy_members(np.array(sources), np.array(targets))
        for number, member_values in values.items():
            optimizer.set_numbers(number, torch.tensor(member_values, dtype=torch.float64,
                                                       device=numbers[number].device))  # fmt: skip

    def copies(self, module, epoch: int):
        """(member, donor, why) of this round, each donor drawn from the top as its member comes: every
        member that diverged since, then the bottom of the ranking by each member's last objective."""
        latest = module.table.latest(self.objective)
        last = {int(p): float(latest[p]) for p in np.flatnonzero(module.alive)}
        order = ranked(last, self.direction)
        n = quantile_size(len(order), self.settings.fraction)
        if n == 0:
            return
        top = order[:n]
        for member in np.flatnonzero(module.diverged_at >= 0):
            yield int(member), self.rng.choice(top), f"diverged at epoch {module.diverged_at[member]}"
        for member in order[-n:]:
            donor = self.rng.choice(top)
            yield member, donor, (f"bottom {self.settings.fraction:g} at epoch {epoch - 1}: {self.objective} "
                                  f"{last[member]:.4g}, donor's {last[donor]:.4g}")  # fmt: skip

    def keys(self) -> list[tuple[str, str]]:
        """(config key, optimizer number) of each hyperparameter PBT changes: (optimizer.lr, lr)."""
        return [(key, key.removeprefix("optimizer.")) for key in self.settings.hyperparameters]

    # --- what a member's record holds ------------------------------------------------------------

    def lineage_rows(self, p: int, histories: list[list[dict]]) -> list[dict]:
        """The history of the weights member p ends with: each lineage segment's rows from its slot."""
        segments = self.lineages[p]
        ends = [s.start for s in segments[1:]] + [math.inf]
        return [row for s, end in zip(segments, ends, strict=True) for row in histories[s.member]
                if s.start <= row["epoch"] < end]  # fmt: skip

    def schedule(self, p: int, histories: list[list[dict]]) -> dict[str, list[tuple[int, float]]]:
        """{key: [(epoch, value), ...]}: where the values along member p's lineage change."""
        rows = self.lineage_rows(p, histories)
        schedules = {}
        for key in self.settings.hyperparameters:
            points: list[tuple[int, float]] = []
            for row in rows:
                value = row[f"hp/{key}"]
                if not points or points[-1][1] != value:
                    points.append((row["epoch"], value))
            schedules[key] = points
        return schedules

    def replay_overrides(self, p: int, histories: list[list[dict]], overrides: list[str]) -> list[str]:
        """Member p's overrides with each PBT value as a schedule: a single run that trains its weights."""
        schedule = {key: points for key, points in self.schedule(p, histories).items() if points}
        replaced = {*schedule, *(f"{key}{SCHEDULE_SUFFIX}" for key in schedule)}
        kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in replaced]
        for key, points in schedule.items():
            pairs = ",".join(f"[{epoch},{value!r}]" for epoch, value in points)
            kept += [f"{key}={points[0][1]!r}", f"{key}{SCHEDULE_SUFFIX}=[{pairs}]"]
        return kept

    def member_record(self, p: int, histories: list[list[dict]], overrides: list[str],
                      run_ids: list[str | None]) -> dict:  # fmt: skip
        """What member p's run keeps as pbt.json: its exploits, lineage, schedule and replay."""
        events = [{**asdict(e), "donor_run_id": run_ids[e.donor]} for e in self.events if e.member == p]
        return {
            "member": p,
            "run_id": run_ids[p],
            "settings": self.settings.describe(),
            "objective": self.objective,
            "direction": self.direction,
            "exploits": events,
            "donations": sum(e.donor == p for e in self.events),
            "lineage": [
                {"from_epoch": s.start, "member": s.member, "run_id": run_ids[s.member]}
                for s in self.lineages[p]
            ],  # fmt: skip
            "schedule": {
                key: [list(point) for point in points] for key, points in self.schedule(p, histories).items()
            },  # fmt: skip
            "replay": self.replay_overrides(p, histories, overrides),
        }
