"""The one LightningModule: manual optimization of P members stacked in one model (a single run is P = 1).

The module receives built things: the stacked model, an optimizer factory, the held-out splits (val,
test) and each member's stop numbers. It keeps one history row per member and epoch, measured at the
weights the epoch starts from (the step record's start evaluation; val and test loss/acc from a forward
pass), and
retires a member that diverges, reaches its stop condition, or whose epoch callback raises
`gdlab.members.Retire`: its weights and history are kept, its slot is zeroed and no longer moves, and
the others go on. Training ends when every member has retired or at max_epochs.

Numbers that change between epochs (gdlab.schedules) are set at each epoch's start from `schedules`, and
every row then carries them as `hp/optimizer.<number>`. Population Based Training (gdlab.pbt, a Lightning
callback) moves members with `copy_member` at its interval boundaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from torch import Tensor

from gdlab.data import Split
from gdlab.interrupts import PENDING
from gdlab.members import Retire
from gdlab.model import MLP
from gdlab.optimizers import Evaluation, MemberOptimizer, StepRecord

_PLAIN_TYPES = (str, bool, int, float, type(None), tuple)
EpochCallback = Callable[[dict], None]
Schedules = dict[str, list[list[tuple[int, float]]]]  # number -> per member: [(epoch, value), ...]


@dataclass
class Stops:
    """Per member: stop once the train loss is below `loss`, or once `evals` evaluations were spent."""

    loss: Sequence[float]
    evals: Sequence[float]


@dataclass
class RunOutcome:
    """What the loop hands back for one member."""

    model: MLP  # standalone, on the CPU
    history: list[dict] = field(repr=False)  # one row per epoch
    evals_fwd: int
    evals_fwdbwd: int
    ls_failures: int
    diverged_at: int | None  # the epoch whose loss was NaN/inf
    pruned: str | None  # why an epoch callback retired it
    ended_at: float | None  # wall-clock time (time.time()) its training ended: retired, or the loop's end


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

    def step_numbers(self) -> list[list[float]]:
        """Per member, from the epoch's last step: loss_after, trial_step, step, backtracks, failed; and
        summed over its steps: evals_fwd, evals_fwdbwd. One list per number, one entry per member."""
        last = self.records[-1]
        fwd, fwdbwd = last.evals_fwd, last.evals_fwdbwd
        if len(self.records) > 1:
            fwd = torch.stack([r.evals_fwd for r in self.records]).sum(0)
            fwdbwd = torch.stack([r.evals_fwdbwd for r in self.records]).sum(0)
        numbers = [
            last.loss_after,
            last.trial_step,
            last.step,
            last.backtracks,
            last.failed.double(),
            fwd,
            fwdbwd,
        ]
        return torch.stack(numbers).tolist()

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
                 schedules: Schedules | None = None, logged_numbers: Sequence[str] = ()):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.make_optimizer = make_optimizer
        self.manual = backprop == "manual"
        self.held_out = dict(held_out)  # name (val, test) -> split
        self.stops = stops
        self.epoch_callbacks = epoch_callbacks
        n = len(epoch_callbacks)
        self.histories: list[list[dict]] = [[] for _ in range(n)]
        self.evals_fwd, self.evals_fwdbwd, self.ls_failures = [0] * n, [0] * n, [0] * n
        self.diverged: list[int | None] = [None] * n
        self.pruned: list[str | None] = [None] * n
        self.retired: list[MLP | None] = [None] * n
        self.ended_at: list[float | None] = [None] * n
        self.alive = list(range(n))
        self.held_out_on_device: dict[str, tuple[Tensor, Tensor]] = {}
        self.epoch = EpochState()
        self.started = 0.0
        self.schedules = schedules or {}
        self.logged_numbers = tuple(logged_numbers)  # each row's hp/optimizer.<number>

    def __setattr__(self, name, value):
        # Lightning sets bookkeeping attributes (e.g. _current_fx_name) on every hook call, and
        # nn.Module.__setattr__'s Parameter/Buffer checks make that ~40% of Lightning's per-epoch
        # cost on these tiny networks. A plain attribute that already exists is set directly,
        # exactly as nn.Module would end up doing.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_optimizers(self):
        return self.make_optimizer(list(self.model.parameters()))

    def on_fit_start(self) -> None:
        self.held_out_on_device = {name: (split.X.to(self.device), split.T.to(self.device))
                                   for name, split in self.held_out.items()}  # fmt: skip
        self.started = time.perf_counter()

    def on_train_start(self) -> None:
        PENDING.deliver()  # a SIGTERM during start-up, now that Lightning handles SIGTERM

    def on_train_epoch_start(self) -> None:
        self.epoch.__init__()
        if self.schedules:
            self.apply_schedules(self.current_epoch)
        with torch.no_grad():
            for X, T in self.held_out_on_device.values():
                Z = self.model(X)
                self.epoch.held_out_metrics += [self.model.loss(Z, T), self.model.accuracy(Z, T)]

    def training_step(self, batch, batch_idx):
        X, T = batch
        opt = self.optimizers()
        model = self.model

        def closure() -> Evaluation:
            if not torch.is_grad_enabled():  # a line-search trial: forward only
                return Evaluation(model.loss(model(X), T))
            opt.zero_grad()
            if self.manual:
                losses, Z = model.manual_loss(X, T)
            else:
                Z = model(X)
                losses = model.loss(Z, T)
            self.manual_backward(losses.sum())  # each member's gradient is that of its own loss
            return Evaluation(losses.detach(), model.accuracy(Z.detach(), T), model.grad_norms())

        self.epoch.add_step(opt.step(closure=closure), X.shape[0])

    def on_train_epoch_end(self) -> None:
        for p, row in self.epoch_rows():
            self.histories[p].append(row)
            try:
                for callback in self.epoch_callbacks[p]:
                    callback(row)
            except Retire as signal:
                self.pruned[p] = str(signal) or "retired by an epoch callback"
                self.retire(p)
                continue
            if not math.isfinite(row["train/loss"]):
                self.diverged[p] = row["epoch"]
                self.retire(p)
            elif row["train/loss"] < self.stops.loss[p] or row["evals/total"] >= self.stops.evals[p]:
                self.retire(p)
        if not self.alive:
            self.trainer.should_stop = True

    def apply_schedules(self, epoch: int) -> None:
        """Set the numbers whose schedules change at `epoch` (for every member with an entry there)."""
        optimizer = self.optimizers().optimizer
        for number, members in self.schedules.items():
            changes = {p: value for p, entries in enumerate(members) for e, value in entries if e == epoch}
            if changes:
                values = optimizer.number(number).clone()
                for p, value in changes.items():
                    values[p] = value
                optimizer.set_numbers(number, values)

    @torch.no_grad()
    def copy_member(self, source: int, target: int) -> None:
        """PBT's exploit: member `target` goes on from member `source`'s weights, gradients, optimizer state
        and evaluation counts, exactly; a retired `target` trains again."""
        if target not in self.alive:
            self.revive(target)
        for param in self.model.parameters():
            param[target] = param[source]
            if param.grad is not None:
                param.grad[target] = param.grad[source]
        self.optimizers().optimizer.copy_member(source, target)
        for counts in (self.evals_fwd, self.evals_fwdbwd, self.ls_failures):
            counts[target] = counts[source]

    def revive(self, p: int) -> None:
        self.retired[p] = self.diverged[p] = self.ended_at[p] = None
        self.alive = sorted([*self.alive, p])
        self.optimizers().optimizer.revive(p)

    def on_train_end(self) -> None:
        now = time.time()
        for p in self.alive:
            self.ended_at[p] = now

    @torch.no_grad()
    def retire(self, p: int) -> None:
        """Keep member p as it is now and stop moving it; zeros keep a diverged member's arithmetic finite."""
        self.retired[p] = self.model.member(p)
        self.ended_at[p] = time.time()
        self.alive.remove(p)
        self.optimizers().optimizer.retire(p)
        for W, b in self.model.layers:
            W[p].zero_()
            b[p].zero_()

    def epoch_rows(self) -> list[tuple[int, dict]]:
        """(member, history row) for every member still training, from one device-to-host transfer."""
        e = self.epoch
        measured = [*e.train_metrics(), *e.held_out_metrics, e.records[-1].start.grad_norms]
        measured = torch.cat([torch.stack(measured[:-1]), measured[-1]]).tolist()
        n_metrics = 2 + len(e.held_out_metrics)
        metrics, norms = measured[:n_metrics], measured[n_metrics:]
        loss_after, trial_step, step, backtracks, failed, fwd, fwdbwd = e.step_numbers()
        now, rows = time.perf_counter() - self.started, []
        optimizer = self.optimizers().optimizer if self.logged_numbers else None
        numbers = {number: optimizer.number(number).tolist() for number in self.logged_numbers}
        for p in self.alive:
            self.evals_fwd[p] += int(fwd[p])
            self.evals_fwdbwd[p] += int(fwdbwd[p])
            self.ls_failures[p] += int(failed[p])
            row = {"epoch": self.current_epoch, "train/loss": metrics[0][p], "train/acc": metrics[1][p]}
            for i, name in enumerate(self.held_out_on_device):
                row[f"{name}/loss"], row[f"{name}/acc"] = metrics[2 + 2 * i][p], metrics[3 + 2 * i][p]
            member_norms = [n[p] for n in norms]
            row["grad_norm"] = math.sqrt(sum(n * n for n in member_norms))
            for l in range(len(member_norms) // 2):
                row[f"grad_norm/layer{l + 1}"] = math.hypot(member_norms[2 * l], member_norms[2 * l + 1])
            row.update(
                loss_before=metrics[0][p],
                loss_after=loss_after[p],
                trial_step=trial_step[p],
                step=step[p],
                backtracks=int(backtracks[p]),
                ls_failed=int(failed[p]),
                ls_failures=self.ls_failures[p],
                **{"evals/fwd": int(fwd[p]), "evals/fwdbwd": int(fwdbwd[p]),
                   "evals/total": self.evals_fwd[p] + self.evals_fwdbwd[p], "time": now},
            )  # fmt: skip
            for number, values in numbers.items():
                row[f"hp/optimizer.{number}"] = values[p]
            rows.append((p, row))
        return rows

    def outcome(self, p: int) -> RunOutcome:
        model = self.retired[p] if self.retired[p] is not None else self.model.member(p)
        return RunOutcome(
            model=model,
            history=self.histories[p],
            evals_fwd=self.evals_fwd[p],
            evals_fwdbwd=self.evals_fwdbwd[p],
            ls_failures=self.ls_failures[p],
            diverged_at=self.diverged[p],
            pruned=self.pruned[p],
            ended_at=self.ended_at[p],
        )
