"""The LightningModule: manual optimization, one closure for every optimizer and gradient mode."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from gdlab.data import Split
from gdlab.model import MLP
from gdlab.optimizers import build_optimizer, step_info

_PLAIN_TYPES = (str, bool, int, float, type(None), tuple)


class EpochState:
    """What one epoch accumulates: kept off the nn.Module, whose __setattr__ is slow on a hot path."""

    def __init__(self, evals: dict):
        self.losses, self.accs, self.sizes = [], [], []
        self.grad_norms = None
        self.test_metrics: tuple = ()
        self.evals_before = dict(evals)

    def add_step(self, start: tuple, rows: int) -> None:
        """A step's start point, (loss, accuracy, grad norms), measured on `rows` rows."""
        loss, accuracy, self.grad_norms = start
        self.losses.append(loss)
        self.accs.append(accuracy)
        self.sizes.append(rows)

    def train_metrics(self) -> list:
        """[loss, accuracy] of the epoch: its one step's, or the mean over mini-batches weighted by size."""
        if len(self.losses) == 1:
            return [self.losses[0], self.accs[0]]
        losses, accs = torch.stack(self.losses), torch.stack(self.accs)
        weights = torch.tensor(self.sizes, dtype=losses.dtype, device=losses.device)
        weights = (weights / weights.sum()).reshape(-1, *[1] * (losses.dim() - 1))  # per step (, member)
        return [(losses * weights).sum(0), (accs * weights).sum(0)]


class GDLabModule(pl.LightningModule):
    """Trains `model` with the configured optimizer; keeps one history row per epoch.

    Every row is measured at the weights the epoch starts from (train loss/acc from the
    optimizer's first evaluation, test loss/acc from a forward pass on the test split),
    plus the optimizer's step record for that epoch.
    """

    def __init__(self, model: MLP, optimizer_cfg, backprop: str, test: Split | None = None,
                 stop_loss: float | None = None, max_evals: int | None = None):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.optimizer_cfg = optimizer_cfg
        self.backprop = backprop
        self.test_split = test
        self.stop_loss = stop_loss
        self.max_evals = max_evals
        self.history: list[dict] = []
        self.evals = {"fwd": 0, "fwdbwd": 0}
        self.ls_failures = 0
        self.diverged_at: int | None = None
        self.epoch_callbacks: list = []  # each called with every finished history row
        self.test_on_device: tuple = ()
        self.epoch = EpochState(self.evals)
        self.carried_over: tuple = ()  # the last forward+backward evaluation of the previous step
        self.started = 0.0

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
        return build_optimizer(self.optimizer_cfg, self.model.parameters())

    def on_fit_start(self) -> None:
        if self.test_split is not None:
            self.test_on_device = (
                self.test_split.X.to(self.device),
                self.test_split.T.to(self.device),
            )
        self.started = time.perf_counter()

    def loss_and_logits(self, X, T):
        if self.backprop == "manual":
            return self.model.manual_loss(X, T)
        Z = self.model(X)
        return self.model.loss(Z, T), Z

    def on_train_epoch_start(self) -> None:
        self.epoch.__init__(self.evals)
        if self.test_on_device:
            X, T = self.test_on_device
            with torch.no_grad():
                Z = self.model(X)
                self.epoch.test_metrics = (self.model.loss(Z, T), self.model.accuracy(Z, T))

    def training_step(self, batch, batch_idx):
        X, T = batch
        opt = self.optimizers()
        evaluations = []  # (loss, accuracy, grad norms) of this step's forward+backward evaluations

        def closure():
            if not torch.is_grad_enabled():  # a line-search trial: forward only
                self.evals["fwd"] += 1
                return self.model.loss(self.model(X), T)
            opt.zero_grad()
            loss, Z = self.loss_and_logits(X, T)
            self.manual_backward(loss)
            self.evals["fwdbwd"] += 1
            evaluations.append((loss.detach(), self.model.accuracy(Z.detach(), T), self.model.grad_norms()))
            return loss

        opt.step(closure=closure)
        # The row reports the step's start point w: its first evaluation, or, when a line search reused
        # the previous step's accepted trial (trial_eval=forward_backward), that trial's evaluation.
        start = self.carried_over if getattr(opt.optimizer, "reused_start", False) else evaluations[0]
        self.carried_over = evaluations[-1] if evaluations else start
        self.epoch.add_step(start, X.shape[0])

    def on_train_epoch_end(self) -> None:
        row = self.epoch_row()
        self.history.append(row)
        for callback in self.epoch_callbacks:
            callback(row)
        if not math.isfinite(row["train/loss"]):
            self.diverged_at = row["epoch"]
            self.trainer.should_stop = True
        elif (self.stop_loss is not None and row["train/loss"] < self.stop_loss) or (
            self.max_evals is not None and row["evals/total"] >= self.max_evals
        ):
            self.trainer.should_stop = True

    def epoch_row(self) -> dict:
        e = self.epoch
        train = e.train_metrics()
        # One device-to-host transfer per epoch for every scalar.
        scalars = torch.cat([torch.stack([*train, *e.test_metrics]), e.grad_norms]).tolist()
        n_metrics = 2 + len(e.test_metrics)
        norms = scalars[n_metrics:]
        row = {"epoch": self.current_epoch, "train/loss": scalars[0], "train/acc": scalars[1]}
        if e.test_metrics:
            row["test/loss"], row["test/acc"] = scalars[2], scalars[3]
        row["grad_norm"] = math.sqrt(sum(n * n for n in norms))
        for l in range(len(norms) // 2):
            row[f"grad_norm/layer{l + 1}"] = math.hypot(norms[2 * l], norms[2 * l + 1])
        info = step_info(self.optimizers().optimizer)
        self.ls_failures += int(info["failed"])
        row.update(
            loss_before=scalars[0],
            loss_after=info["loss_after"],
            trial_step=info["trial_step"],
            step=info["step"],
            backtracks=info["backtracks"],
            ls_failed=int(info["failed"]),
            ls_failures=self.ls_failures,
            **{
                "evals/fwd": self.evals["fwd"] - e.evals_before["fwd"],
                "evals/fwdbwd": self.evals["fwdbwd"] - e.evals_before["fwdbwd"],
                "evals/total": self.evals["fwd"] + self.evals["fwdbwd"],
                "time": time.perf_counter() - self.started,
            },
        )
        return row
