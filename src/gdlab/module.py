"""The LightningModule: manual optimization, one closure for every optimizer and gradient mode."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from gdlab.data import Split
from gdlab.model import MLP
from gdlab.optimizers import build_optimizer, step_info


class GDLabModule(pl.LightningModule):
    """Trains `model` with the configured optimizer; keeps one history row per epoch.

    Every row is measured at the weights the epoch starts from (train loss/acc from the
    optimizer's first evaluation, test loss/acc from a forward pass on the test split),
    plus the optimizer's step record for that epoch.
    """

    def __init__(self, model: MLP, optimizer_cfg, backprop: str, test: Split | None = None,
                 stop_loss: float | None = None):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.optimizer_cfg = optimizer_cfg
        self.backprop = backprop
        self.test_split = test
        self.stop_loss = stop_loss
        self.history: list[dict] = []
        self.evals = {"fwd": 0, "fwdbwd": 0}
        self.ls_failures = 0
        self.diverged_at: int | None = None
        self.epoch_callbacks: list = []  # called with each finished history row

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_cfg, self.model.parameters())

    def on_fit_start(self) -> None:
        self._test = None
        if self.test_split is not None:
            self._test = (self.test_split.X.to(self.device), self.test_split.T.to(self.device))
        self._t0 = time.perf_counter()

    def loss_and_logits(self, X, T):
        if self.backprop == "manual":
            return self.model.manual_loss(X, T)
        Z = self.model(X)
        return self.model.loss(Z, T), Z

    def on_train_epoch_start(self) -> None:
        self._epoch = {"loss": [], "acc": [], "n": [], "evals_before": dict(self.evals)}
        self._grad_norms = None
        if self._test is not None:
            with torch.no_grad():
                Z = self.model(self._test[0])
                self._test_metrics = (self.model.loss(Z, self._test[1]), self.model.accuracy(Z, self._test[1]))

    def training_step(self, batch, batch_idx):
        X, T = batch
        opt = self.optimizers()
        first: dict = {}

        def closure():
            if not torch.is_grad_enabled():  # a line-search trial: forward only
                self.evals["fwd"] += 1
                return self.model.loss(self.model(X), T)
            opt.zero_grad()
            loss, Z = self.loss_and_logits(X, T)
            self.manual_backward(loss)
            self.evals["fwdbwd"] += 1
            if not first:
                first.update(loss=loss.detach(), acc=self.model.accuracy(Z.detach(), T))
                self._grad_norms = self.model.layer_grad_norms()
            return loss

        opt.step(closure=closure)
        self._epoch["loss"].append(first["loss"])
        self._epoch["acc"].append(first["acc"])
        self._epoch["n"].append(X.shape[0])

    def on_train_epoch_end(self) -> None:
        row = self._epoch_row()
        self.history.append(row)
        for callback in self.epoch_callbacks:
            callback(row)
        if not math.isfinite(row["train/loss"]):
            self.diverged_at = row["epoch"]
            self.trainer.should_stop = True
        elif self.stop_loss is not None and row["train/loss"] < self.stop_loss:
            self.trainer.should_stop = True

    def _epoch_row(self) -> dict:
        e = self._epoch
        weights = torch.tensor(e["n"], dtype=e["loss"][0].dtype, device=e["loss"][0].device)
        weights = weights / weights.sum()
        values = [(torch.stack(e["loss"]) * weights).sum(), (torch.stack(e["acc"]) * weights).sum()]
        if self._test is not None:
            values += list(self._test_metrics)
        grad_norms = self._grad_norms
        # One device-to-host transfer per epoch for all the scalars.
        scalars = torch.cat([torch.stack(values), grad_norms]).tolist()
        n_metrics = len(values)
        layer_norms = scalars[n_metrics:]
        row = {"epoch": self.current_epoch, "train/loss": scalars[0], "train/acc": scalars[1]}
        if self._test is not None:
            row["test/loss"], row["test/acc"] = scalars[2], scalars[3]
        row["grad_norm"] = math.sqrt(sum(n * n for n in layer_norms))
        for l, n in enumerate(layer_norms, start=1):
            row[f"grad_norm/layer{l}"] = n
        info = step_info(self.optimizers().optimizer)
        self.ls_failures += int(info["failed"])
        fwd = self.evals["fwd"] - e["evals_before"]["fwd"]
        fwdbwd = self.evals["fwdbwd"] - e["evals_before"]["fwdbwd"]
        row.update(
            {
                "loss_before": scalars[0],
                "loss_after": info["loss_after"],
                "trial_step": info["trial_step"],
                "step": info["step"],
                "backtracks": info["backtracks"],
                "ls_failed": int(info["failed"]),
                "ls_failures": self.ls_failures,
                "evals/fwd": fwd,
                "evals/fwdbwd": fwdbwd,
                "evals/total": self.evals["fwd"] + self.evals["fwdbwd"],
                "time": time.perf_counter() - self._t0,
            }
        )
        return row
