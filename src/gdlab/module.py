"""The one LightningModule: manual optimization of P members stacked in one model (a single run is P = 1).

The module receives built things: the stacked model, an optimizer factory, the held-out splits (val,
test) and each member's stop numbers. It keeps one history row per member and epoch, measured at the
weights the epoch starts from (the step record's start evaluation; val and test loss/acc from a forward
pass), as columns: the epoch's rows are (P,) tensors stacked on the model's device and brought to the
host in one transfer per epoch, whatever P is (`EpochTable`); sinks (history files, MLflow) take them in
bulk, and only members with epoch callbacks of their own (a sweep's pruner) get a row as a dict.

A member that diverges, reaches its stop condition, or whose epoch callback raises
`gdlab.members.Retire` retires: a mask, not a branch. Its weights are kept as they were, its slot is
zeroed and no longer moves, and the others go on. Training ends when every member has retired or at
max_epochs.

Numbers that change between epochs (gdlab.schedules) are set at each epoch's start from `schedules`, and
every row then carries them as `hp/optimizer.<number>`. Population Based Training (gdlab.pbt, a Lightning
callback) moves members with `copy_members` at its interval boundaries.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from gdlab.data import Split
from gdlab.epoch_table import STEP_COLUMNS, BlockLayout, EpochTable, history_columns
from gdlab.interrupts import PENDING
from gdlab.members import Retire
from gdlab.model import MLP, per_member
from gdlab.optimizers import Evaluation, MemberOptimizer, StepRecord

_PLAIN_TYPES = (str, bool, int, float, type(None), tuple)
EpochCallback = Callable[[dict], None]
Schedules = dict[str, list[list[tuple[int, float]]]]  # number -> per member: [(epoch, value), ...]


@dataclass
class Stops:
    """Per member: stop once the train loss is below `loss`, or once `evals` evaluations were spent."""

    loss: Sequence[float]
    evals: Sequence[float]


class EpochSink(Protocol):
    """Takes a population's epoch in bulk: `table`'s newest epoch, for the members in `members` (an index
    array: those that trained in it). The history files and the MLflow runs are fed this way."""

    def __call__(self, table: EpochTable, members: np.ndarray) -> None: ...


class GroupCallback(Protocol):
    """Decides about several members together (a sweep trial's replicates), once an epoch, after every
    member's own epoch callbacks have seen its row: `epoch_end` may raise `gdlab.members.Retire`, and then
    all of `members` (indices in the population) retire."""

    members: Sequence[int]

    def epoch_end(self, epoch: int) -> None: ...


class EpochState:
    """What one epoch accumulates, over its steps (one for full batch): kept off the nn.Module, whose
    __setattr__ is slow on a hot path."""

    def __init__(self):
        self.records: list[StepRecord] = []
        self.sizes: list[int] = []
        self.held_out_metrics: list[Tensor] = []  # loss, accuracy of each held-out split, in order

    def add_step(self, record: StepRecord, rows: int) -> None:
        self.records.append(record)
        self.sizes.append(rows)

    def step_numbers(self) -> list[Tensor]:
        """Per member, from the epoch's last step: loss_after, trial_step, step, backtracks, failed; and
        summed over its steps: evals_fwd, evals_fwdbwd. (P,) tensors."""
        last = self.records[-1]
        fwd, fwdbwd = last.evals_fwd, last.evals_fwdbwd
        if len(self.records) > 1:
            fwd = torch.stack([r.evals_fwd for r in self.records]).sum(0)
            fwdbwd = torch.stack([r.evals_fwdbwd for r in self.records]).sum(0)
        return [
            last.loss_after,
            last.trial_step,
            last.step,
            last.backtracks,
            last.failed.double(),  # as a number, so that the epoch's values concatenate without promotion
            fwd,
            fwdbwd,
        ]

    def train_metrics(self) -> list[Tensor]:
        """[loss, accuracy] per member: the one step's, or the mean over mini-batches weighted by size."""
        if len(self.records) == 1:
            start = self.records[0].start
            return [start.loss, start.accuracy]
        losses = torch.stack([r.start.loss for r in self.records])
        accs = torch.stack([r.start.accuracy for r in self.records])
        weights = torch.tensor(self.sizes, dtype=losses.dtype, device=losses.device)
        weights = (weights / weights.sum()).unsqueeze(1)  # (steps, 1) against (steps, P)
        return [(losses * weights).sum(0), (accs * weights).sum(0)]


class TrainingModule(pl.LightningModule):
    def __init__(self, model: MLP, make_optimizer: Callable[[list], MemberOptimizer], backprop: str,
                 held_out: dict[str, Split], stops: Stops, epoch_callbacks: list[list[EpochCallback]],
                 schedules: Schedules | None = None, logged_numbers: Sequence[str] = (),
                 sinks: Sequence[EpochSink] = (), group_callbacks: Sequence[GroupCallback] = (),
                 train_weights: Tensor | None = None):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.make_optimizer = make_optimizer
        self.manual = backprop == "manual"
        self.held_out = dict(held_out)  # name (val, test) -> split
        self.stops = stops
        self.epoch_callbacks = epoch_callbacks
        self.sinks = list(sinks)
        self.group_callbacks = list(group_callbacks)
        n = self.n_members = len(epoch_callbacks)
        self.with_callbacks = np.array([p for p, c in enumerate(epoch_callbacks) if c], dtype=np.int64)
        self.logged_numbers = tuple(logged_numbers)  # each row's hp/optimizer.<number>
        self.table = EpochTable(self.column_names(), n)
        # Per member, on the host (each epoch's one transfer brings what they are made of):
        self.diverged_at = np.full(n, -1, dtype=np.int64)  # -1: never
        self.ended_at = np.full(n, np.nan)  # time.time() of its retirement
        self.pruned: list[str | None] = [None] * n
        self.alive = np.ones(n, dtype=bool)
        self.kept: list[Tensor] | None = None  # the retired members' weights, as they were (stacked)
        self.retired_mask: Tensor | None = None
        self.held_out_on_device: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        self.train_weights = train_weights  # each member's training rows (k-fold), None: all rows
        self.epoch = EpochState()
        self.started = 0.0
        self.schedule_changes = schedule_changes(schedules or {})

    def __setattr__(self, name, value):
        # Lightning sets bookkeeping attributes (e.g. _current_fx_name) on every hook call, and
        # nn.Module.__setattr__'s Parameter/Buffer checks make that ~40% of Lightning's per-epoch
        # cost on these tiny networks. A plain attribute that already exists is set directly,
        # exactly as nn.Module would end up doing.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def column_names(self) -> list[str]:
        """The history's columns, in a row's order."""
        splits = [f"{name}/{metric}" for name in self.held_out for metric in ("loss", "acc")]
        layers = [f"grad_norm/layer{l + 1}" for l in range(self.model.n_layers)]
        return ["epoch", "train/loss", "train/acc", *splits, "grad_norm", *layers, *STEP_COLUMNS,
                *(f"hp/optimizer.{number}" for number in self.logged_numbers)]  # fmt: skip

    def configure_optimizers(self):
        return self.make_optimizer(list(self.model.parameters()))

    def on_fit_start(self) -> None:
        self.held_out_on_device = {name: (split.X.to(self.device), split.T.to(self.device),
                                          on(split.weights, self.device))
                                   for name, split in self.held_out.items()}  # fmt: skip
        self.train_weights = on(self.train_weights, self.device)
        # Running totals of the history's own columns: kept beside the table, on the host.
        self.counts = np.zeros((3, self.n_members))  # as COUNTS names them
        self.stop_loss = np.asarray(self.stops.loss, dtype=np.float64)
        self.stop_evals = np.asarray(self.stops.evals, dtype=np.float64)
        self.layout = BlockLayout(2 + 2 * len(self.held_out), len(self.logged_numbers), self.model.n_layers)
        self.members = np.flatnonzero(self.alive)  # those still training, as an index array
        self.recorded = self.alive.copy()  # as the table keeps it: replaced, not changed, when alive changes
        self.started = time.perf_counter()

    def on_train_start(self) -> None:
        PENDING.deliver()  # a SIGTERM during start-up, now that Lightning handles SIGTERM

    def on_train_epoch_start(self) -> None:
        self.epoch.__init__()
        if self.current_epoch in self.schedule_changes:
            self.apply_schedules(self.current_epoch)
        with torch.no_grad():
            model = self.model
            for X, T, weights in self.held_out_on_device.values():
                Z = model(X)
                self.epoch.held_out_metrics += [model.loss(Z, T, weights), model.accuracy(Z, T, weights)]

    def training_step(self, batch, batch_idx):
        X, T = batch
        opt = self.optimizers()
        model, weights = self.model, self.train_weights

        def closure() -> Evaluation:
            if not torch.is_grad_enabled():  # a line-search trial: forward only
                return Evaluation(model.loss(model(X), T, weights))
            opt.zero_grad()
            if self.manual:
                losses, Z = model.manual_loss(X, T, weights)
            else:
                Z = model(X)
                losses = model.loss(Z, T, weights)
            self.manual_backward(losses.sum())  # each member's gradient is that of its own loss
            return Evaluation(losses.detach(), model.accuracy(Z.detach(), T, weights), model.grad_norms())

        self.epoch.add_step(opt.step(closure=closure), X.shape[0])

    def on_train_epoch_end(self) -> None:
        """The epoch's rows for every member in one transfer; then whoever diverged, stopped or was retired
        by its epoch callback retires, all at once."""
        row = self.epoch_row()
        self.table.append(self.as_columns(row), self.recorded)
        for sink in self.sinks:
            sink(self.table, self.members)
        ending, pruned = self.ending(row[1], row[self.layout.total_column]), self.run_callbacks()
        if ending is None and pruned is None:  # the common epoch: nobody retires
            return
        nobody = np.zeros(self.n_members, dtype=bool)
        diverged, stopped = ending or (nobody, nobody)
        pruned = nobody if pruned is None else pruned
        self.diverged_at[diverged & ~pruned] = self.current_epoch
        self.retire(diverged | stopped | pruned)
        if not self.alive.any():
            self.trainer.should_stop = True

    def epoch_row(self) -> list:
        """The epoch's history row in column order, from one transfer of what it measured: one member's
        values as Python floats, every member's as (P,) arrays, by the same arithmetic
        (gdlab.epoch_table.history_columns), a few dozen operations whatever P is."""
        measured = self.epoch_block()
        epoch, elapsed = self.current_epoch, time.perf_counter() - self.started
        if self.n_members == 1:
            row, counts = history_columns(measured.ravel().tolist(), self.counts.ravel().tolist(), epoch,
                                          elapsed, self.layout, math.sqrt)  # fmt: skip
            self.counts[:, 0] = counts
        else:
            row, counts = history_columns(list(measured), list(self.counts), epoch, elapsed, self.layout,
                                          np.sqrt)  # fmt: skip
            self.counts = np.array(counts)
        return row

    def as_columns(self, row: list) -> np.ndarray:
        """`row` as the table's (n_columns, P) float64 block."""
        if self.n_members == 1:
            return np.array(row)[:, None]
        columns = np.empty((len(row), self.n_members))
        for i, values in enumerate(row):
            columns[i] = values
        return columns

    def epoch_block(self) -> np.ndarray:
        """What the epoch measured, on the host as (rows, P) float64 (`BlockLayout`'s rows): the device
        only concatenates (P,) tensors; one transfer."""
        e = self.epoch
        measured = [*e.train_metrics(), *e.held_out_metrics, *e.step_numbers()]
        if self.logged_numbers:
            optimizer = self.optimizers().optimizer
            measured += [optimizer.number(number) for number in self.logged_numbers]
        measured.append(e.records[-1].start.grad_norms.flatten())  # (2 * layers, P): |dW1|, |db1|, ...
        return torch.cat(measured).double().cpu().numpy().reshape(-1, self.n_members)  # 32-bit: widened

    def ending(self, train_loss, total) -> tuple[np.ndarray, np.ndarray] | None:
        """Who diverged (a NaN/inf train loss) and who met a stop, among the members still training (each
        value a float for one member, else (P,)); None: nobody."""
        if self.n_members == 1:  # a single run's every epoch: Python floats
            if math.isfinite(train_loss) and train_loss >= self.stop_loss[0] and total < self.stop_evals[0]:
                return None
            train_loss, total = np.array([train_loss]), np.array([total])
        diverged = self.alive & ~np.isfinite(train_loss)
        stopped = self.alive & ((train_loss < self.stop_loss) | (total >= self.stop_evals))
        return (diverged, stopped) if (diverged | stopped).any() else None

    def run_callbacks(self) -> np.ndarray | None:
        """Each member's own epoch callbacks (a sweep's pruner) with its row; who asked to retire (None:
        nobody)."""
        if not len(self.with_callbacks) and not self.group_callbacks:
            return None
        pruned = np.zeros(self.n_members, dtype=bool)
        for p in self.with_callbacks[self.alive[self.with_callbacks]]:
            row = self.table.row(p)
            try:
                for callback in self.epoch_callbacks[p]:
                    callback(row)
            except Retire as signal:
                self.pruned[p] = str(signal) or "retired by an epoch callback"
                pruned[p] = True
        for group in self.group_callbacks:
            try:
                group.epoch_end(self.current_epoch)
            except Retire as signal:
                members = np.asarray(group.members, dtype=np.int64)
                for p in members[self.alive[members] & ~pruned[members]]:
                    self.pruned[p] = str(signal) or "retired by an epoch callback"
                    pruned[p] = True
        return pruned if pruned.any() else None

    def apply_schedules(self, epoch: int) -> None:
        """Set the numbers whose schedules change at `epoch` (for every member with an entry there)."""
        optimizer = self.optimizers().optimizer
        for number, (members, values) in self.schedule_changes[epoch].items():
            current = optimizer.number(number).clone()
            current[members.to(current.device)] = values.to(current.device)
            optimizer.set_numbers(number, current)

    @torch.no_grad()
    def copy_members(self, sources: np.ndarray, targets: np.ndarray) -> None:
        """PBT's exploit: members `targets` go on from members `sources`' weights, gradients, optimizer state
        and evaluation counts, exactly; a retired target trains again."""
        reviving = np.zeros(self.n_members, dtype=bool)
        reviving[targets] = ~self.alive[targets]
        if reviving.any():
            self.revive(reviving)
        source, target = (torch.as_tensor(a, device=self.device) for a in (sources, targets))
        for param in self.model.parameters():
            param.index_copy_(0, target, param.index_select(0, source))
            if param.grad is not None:
                param.grad.index_copy_(0, target, param.grad.index_select(0, source))
        self.optimizers().optimizer.copy_members(source, target)
        self.counts[:, targets] = self.counts[:, sources]

    def revive(self, members: np.ndarray) -> None:
        self.diverged_at[members] = -1
        self.ended_at[members] = np.nan
        self.alive |= members
        self.members = np.flatnonzero(self.alive)
        self.recorded = self.alive.copy()
        mask = torch.as_tensor(members, device=self.device)
        self.retired_mask &= ~mask
        self.optimizers().optimizer.revive(mask)

    def on_train_end(self) -> None:
        self.ended_at[self.alive] = time.time()

    @torch.no_grad()
    def retire(self, members: np.ndarray) -> None:
        """Keep the members of the mask `members` as they are now and stop moving them; zeros keep a
        diverged member's arithmetic finite."""
        self.ended_at[members] = time.time()
        self.alive &= ~members
        self.members = np.flatnonzero(self.alive)
        self.recorded = self.alive.copy()
        mask = torch.as_tensor(members, device=self.device)
        params = list(self.model.parameters())
        if self.kept is None:
            self.kept = [p.detach().clone() for p in params]
            self.retired_mask = torch.zeros_like(mask)
        self.retired_mask |= mask
        self.optimizers().optimizer.retire(mask)
        for param, kept in zip(params, self.kept, strict=True):
            view = per_member(mask, param)
            kept.copy_(torch.where(view, param, kept))
            param.masked_fill_(view, 0.0)

    @torch.no_grad()
    def final_model(self) -> MLP:
        """The stacked model at each member's final weights: a retired member's as it retired."""
        if self.kept is None:
            return self.model
        final = copy.deepcopy(self.model)
        for param, kept in zip(final.parameters(), self.kept, strict=True):
            param.copy_(torch.where(per_member(self.retired_mask, param), kept, param))
        return final

    def outcomes(self) -> PopulationOutcome:
        return PopulationOutcome(
            model=self.final_model(),
            table=self.table,
            evals_fwd=self.count("evals_fwd"),
            evals_fwdbwd=self.count("evals_fwdbwd"),
            ls_failures=self.count("ls_failures"),
            diverged_at=self.diverged_at,
            pruned=self.pruned,
            ended_at=self.ended_at,
        )

    def count(self, name: str) -> np.ndarray:
        """Every member's running total `name` (one of COUNTS) as integers."""
        counts = getattr(self, "counts", None)
        if counts is None:  # training never started
            return np.zeros(self.n_members, dtype=np.int64)
        return counts[COUNTS.index(name)].astype(np.int64)


def on(tensor: Tensor | None, device) -> Tensor | None:
    return None if tensor is None else tensor.to(device)


COUNTS = ("ls_failures", "evals_fwd", "evals_fwdbwd")  # the running totals, as epoch_columns keeps them


@dataclass
class PopulationOutcome:
    """What the loop hands back for the population: per-member numbers as (P,) arrays."""

    model: MLP  # stacked, at each member's final weights
    table: EpochTable = field(repr=False)
    evals_fwd: np.ndarray
    evals_fwdbwd: np.ndarray
    ls_failures: np.ndarray
    diverged_at: np.ndarray  # the epoch whose loss was NaN/inf, -1: none
    pruned: list[str | None]  # why an epoch callback retired it
    ended_at: np.ndarray  # wall-clock time (time.time()) its training ended; NaN: the loop did not end


def schedule_changes(schedules: Schedules) -> dict[int, dict[str, tuple[Tensor, Tensor]]]:
    """epoch -> number -> (members, values) that change at that epoch, as tensors (set in one step)."""
    changes: dict[int, dict[str, tuple[list, list]]] = {}
    for number, members in schedules.items():
        for p, entries in enumerate(members):
            for epoch, value in entries:
                members_values = changes.setdefault(epoch, {}).setdefault(number, ([], []))
                members_values[0].append(p)
                members_values[1].append(value)
    return {
        epoch: {n: (torch.tensor(m), torch.tensor(v, dtype=torch.float64)) for n, (m, v) in numbers.items()}
        for epoch, numbers in changes.items()
    }
