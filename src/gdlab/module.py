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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from gdlab.data import Split
from gdlab.epoch_table import STEP_COLUMNS, EpochTable
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
            last.failed,
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
        columns, diverged, stopped = self.epoch_columns()
        members = np.flatnonzero(self.alive)
        self.table.append(columns, self.alive)
        for sink in self.sinks:
            sink(self.table, members)
        pruned = self.run_callbacks()
        diverged_now = diverged & ~pruned
        self.diverged_at[diverged_now] = self.current_epoch
        retiring = diverged | stopped | pruned
        if retiring.any():
            self.retire(retiring)
        if not self.alive.any():
            self.trainer.should_stop = True

    def epoch_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's history columns (n_columns, P) float64, and who diverged or met a stop.

        The device only stacks what the epoch measured; the one transfer brings it to the host, where the
        derived columns and the running evaluation counts cost a few numpy operations, whatever P is."""
        e = self.epoch
        optimizer = self.optimizers().optimizer
        numbers = [optimizer.number(number) for number in self.logged_numbers]
        measured = [*e.train_metrics(), *e.held_out_metrics, *e.step_numbers(), *numbers]
        norms = e.records[-1].start.grad_norms  # (2 * layers, P): |dW1|, |db1|, ...
        block = torch.cat([torch.stack([as_float64(t) for t in measured]), as_float64(norms)]).cpu().numpy()
        n, k, layers = 2 + len(e.held_out_metrics), len(numbers), self.model.n_layers
        counts = self.counts  # ls_failures, evals/fwd, evals/fwdbwd so far
        counts += block[n + 4 : n + 7]  # this epoch's failed, fwd, fwdbwd
        squares = np.square(block[n + 7 + k :])
        columns = np.empty((len(self.table.names), block.shape[1]))  # in column_names' order
        columns[0] = self.current_epoch
        columns[1 : n + 1] = block[:n]  # train, then each held-out split: loss, acc
        columns[n + 1] = squares.sum(0)  # grad_norm, then per layer
        columns[n + 2 : n + 2 + layers] = squares[0::2] + squares[1::2]
        np.sqrt(columns[n + 1 : n + 2 + layers], out=columns[n + 1 : n + 2 + layers])
        i = n + 2 + layers  # STEP_COLUMNS from here
        columns[i] = block[0]  # loss_before
        columns[i + 1 : i + 6] = block[n : n + 5]  # loss_after, trial_step, step, backtracks, ls_failed
        columns[i + 6] = counts[0]
        columns[i + 7 : i + 9] = block[n + 5 : n + 7]
        columns[i + 9] = counts[1] + counts[2]  # evals/total
        columns[i + 10] = time.perf_counter() - self.started
        columns[i + 11 :] = block[n + 7 : n + 7 + k]
        train_loss, total = columns[1], columns[i + 9]
        stopped = (train_loss < self.stop_loss) | (total >= self.stop_evals)
        return columns, self.alive & ~np.isfinite(train_loss), self.alive & stopped

    def run_callbacks(self) -> np.ndarray:
        """Each member's own epoch callbacks (a sweep's pruner) with its row; who asked to retire."""
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
        return pruned

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


def as_float64(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.double()


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
