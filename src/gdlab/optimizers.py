"""Optimizers: torch.optim for GD / SGD / momentum / Adam / L-BFGS, and Armijo backtracking.

Closure convention (shared by every optimizer here): called with grad enabled, the closure
computes the loss *and* fills `.grad` (one forward+backward evaluation); called under
``torch.no_grad()`` it only evaluates the loss (one forward evaluation).
"""

from __future__ import annotations

import math

import torch
from torch.optim import LBFGS, SGD, Adam, Optimizer

OPTIMIZERS = ("gd", "sgd", "momentum", "backtracking", "adam", "lbfgs")
RESETS = ("initial", "previous", "grow")
TRIAL_EVALS = ("forward", "forward_backward")
FAILURE_MODES = ("revert", "tiny_step")


def armijo_condition(f_trial, f0, step, grad_sq, c):
    """Sufficient decrease: f(w - a*g) <= f(w) - c * a * ||g||^2. A non-finite trial fails.

    Floats for one run; per-member tensors for a population (gdlab.population), elementwise.
    """
    return (abs(f_trial) < math.inf) & (f_trial <= f0 - c * step * grad_sq)


class Backtracking(Optimizer):
    """Full-batch gradient descent with an Armijo backtracking line search.

    Each step evaluates f and g at w (forward+backward), then tries w - a*g for
    a = a0, beta*a0, beta^2*a0, ... (forward only) until the Armijo condition holds.
    Trial points are always assigned from a saved copy of w, so no drift accumulates.

    trial_eval=forward_backward evaluates each trial with its gradient instead, so the accepted
    trial's f and g are the next step's: one forward+backward per step when the first trial passes
    (with reset=grow and a gentle growth), the floor GD has too.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        c: float = 1e-4,
        beta: float = 0.5,
        reset: str = "initial",
        growth: float = 2.0,
        lr_max: float = 10.0,
        lr_min: float = 1e-10,
        max_backtracks: int = 50,
        on_failure: str = "revert",
        tiny_step: float = 1e-6,
        trial_eval: str = "forward",
    ):
        defaults = dict(lr=lr, c=c, beta=beta, reset=reset, growth=growth, lr_max=lr_max,
                        lr_min=lr_min, max_backtracks=max_backtracks, on_failure=on_failure,
                        tiny_step=tiny_step, trial_eval=trial_eval)  # fmt: skip
        super().__init__(params, defaults)
        self.last_accepted: float | None = None
        self.accepted_loss: float | None = None  # trial_eval=forward_backward: f at w, .grad holds g(w)
        self.reused_start = False
        self.last_step: dict = {}

    def first_trial_step(self, group) -> float:
        if group["reset"] == "initial" or self.last_accepted is None:
            return group["lr"]
        if group["reset"] == "previous":
            return self.last_accepted
        return min(self.last_accepted * group["growth"], group["lr_max"])  # grow

    @torch.no_grad()
    def step(self, closure):
        (group,) = self.param_groups
        params = [p for p in group["params"] if p.requires_grad]
        reuse = group["trial_eval"] == "forward_backward"
        self.reused_start = reuse and self.accepted_loss is not None
        if self.reused_start:
            f0 = self.accepted_loss  # f and .grad at w came with the last accepted trial
        else:
            with torch.enable_grad():
                f0 = closure().item()
        w0 = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        grad_sq = float(sum((g * g).sum() for g in grads))

        def move_to(step: float) -> None:
            for p, w, g in zip(params, w0, grads, strict=True):
                torch.add(w, g, alpha=-step, out=p)

        trial = step = self.first_trial_step(group)
        accepted, backtracks, f_trial = False, 0, math.nan
        while True:
            move_to(step)
            with torch.set_grad_enabled(reuse):  # forward_backward: the trial's gradient is kept if accepted
                f_trial = closure().item()
            if armijo_condition(f_trial, f0, step, grad_sq, group["c"]):
                accepted = True
                break
            if backtracks >= group["max_backtracks"] or step * group["beta"] < group["lr_min"]:
                break
            step *= group["beta"]
            backtracks += 1

        self.accepted_loss = f_trial if accepted and reuse else None
        if accepted:
            self.last_accepted, f_after = step, f_trial
        else:
            # Keep a usable (never zero) start for the next step; the failed trial is not taken.
            self.last_accepted = max(step, group["lr_min"])
            step = group["tiny_step"] if group["on_failure"] == "tiny_step" else 0.0
            move_to(step)
            f_after = f0 if step == 0.0 else math.nan
        self.last_step = dict(
            trial_step=trial,
            step=step,
            backtracks=backtracks,
            loss_after=f_after,
            failed=not accepted,
        )
        return f0


def build_optimizer(cfg, params) -> Optimizer:
    name = cfg.name
    if name == "gd":
        return SGD(params, lr=cfg.lr)
    if name in ("sgd", "momentum"):
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "adam":
        return Adam(params, lr=cfg.lr)
    if name == "lbfgs":
        return LBFGS(params, lr=cfg.lr, max_iter=cfg.max_iter, history_size=cfg.history_size,
                     line_search_fn="strong_wolfe")  # fmt: skip
    if name == "backtracking":
        keys = ("lr", "c", "beta", "reset", "growth", "lr_max", "lr_min", "max_backtracks",
                "on_failure", "tiny_step", "trial_eval")  # fmt: skip
        return Backtracking(params, **{k: cfg[k] for k in keys})
    raise ValueError(f"unknown optimizer {name!r}")


def step_info(optimizer: Optimizer) -> dict:
    """The step record fields an optimizer knows: the line search's own, or its fixed lr."""
    if isinstance(optimizer, Backtracking):
        return optimizer.last_step
    lr = optimizer.param_groups[0]["lr"]
    return dict(trial_step=lr, step=lr, backtracks=0, loss_after=math.nan, failed=False)
