"""Step-size rules, each written once in its per-member form.

A population of P members trains as one model whose parameters carry a leading member axis
(W (P, fan_in, fan_out), b (P, 1, fan_out)); a single run is P = 1. Every number a member may have
of its own (lr, momentum, c, beta, ...) is a tensor of shape (P,), and every rule here updates each
member with its own numbers only, so member p moves exactly as it would alone.

The closure convention, shared by every optimizer here: with grad enabled, ``closure()`` computes
every member's loss *and* fills ``.grad`` (one forward+backward evaluation) and returns an
`Evaluation`; under ``torch.no_grad()`` it computes the losses only (one forward evaluation). Each
``step`` returns a `StepRecord`: what the step did, per member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import LBFGS, Optimizer

from gdlab.model import per_member

OPTIMIZERS = ("gd", "sgd", "momentum", "backtracking", "adam", "lbfgs", "polyak", "bb", "nonmonotone")
RESETS = ("initial", "previous", "grow")
TRIAL_EVALS = ("forward", "forward_backward")
FAILURE_MODES = ("revert", "tiny_step")


@dataclass
class Evaluation:
    """One evaluation of every member at the current weights: each field's last axis is the member.

    `accuracy` and `grad_norms` ((n_params, P): |dW1|, |db1|, |dW2|, ...) come with forward+backward
    evaluations only.
    """

    loss: Tensor
    accuracy: Tensor | None = None
    grad_norms: Tensor | None = None

    def where(self, mask: Tensor, other: Evaluation) -> Evaluation:
        """Per member: `other`'s values where `mask`, else these."""
        mask = mask.to(self.loss.device)
        pairs = zip(self.fields(), other.fields(), strict=True)
        return Evaluation(*(None if a is None else torch.where(mask, b, a) for a, b in pairs))

    def fields(self) -> tuple:
        return self.loss, self.accuracy, self.grad_norms


@dataclass
class StepRecord:
    """What one optimizer step did, per member (every tensor has shape (P,); `start` per its fields).

    start: the evaluation at the weights the step started from (the epoch row's train metrics);
    trial_step / step: the first step size tried and the one taken (0 for a retired member);
    backtracks: how often the step was shrunk; loss_after: the loss at the accepted point (line
    searches; NaN otherwise); failed: the line search found no acceptable step;
    evals_fwd / evals_fwdbwd: the member's forward and forward+backward evaluations in this step.
    """

    start: Evaluation
    trial_step: Tensor
    step: Tensor
    backtracks: Tensor
    loss_after: Tensor
    failed: Tensor
    evals_fwd: Tensor
    evals_fwdbwd: Tensor

    @staticmethod
    def fixed(lr: Tensor, active: Tensor) -> tuple:
        """A rule without a search (one forward+backward evaluation, the step is the lr): every field
        but `start`, to be made once and shared by the steps."""
        zeros = torch.zeros(len(lr), dtype=torch.float64, device=lr.device)
        lr = torch.where(active, lr, 0.0)  # a retired member takes no step
        return lr, lr, zeros, torch.full_like(zeros, math.nan), zeros.bool(), zeros, active.double()


def member_tensor(values: Sequence[float], device: torch.device | str = "cpu") -> Tensor:
    """Per-member numbers as a float64 (P,) tensor on the model's device, where the rules keep them."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)


class MemberOptimizer(Optimizer):
    """Base of the per-member rules: the set of members still training (`active`, (P,) bool), and every
    per-member number, on the parameters' device."""

    def __init__(self, params, n_members: int):
        super().__init__(params, {})
        self.params = [p for p in self.param_groups[0]["params"]]
        self.device = self.params[0].device
        self.active = torch.ones(n_members, dtype=torch.bool, device=self.device)
        self.all_active = True

    def retire(self, members: Tensor) -> None:
        """The members of the (P,) bool mask `members` stop moving (their weights are kept by the caller)."""
        self.active &= ~members.to(self.device)
        self.all_active = False
        self.moving_changed()

    def moving_changed(self) -> None:
        """Hook for rules that cache what depends on the active members."""

    def mask(self, values: Tensor) -> Tensor:
        """`values` (P,) with zeros for retired members."""
        return values if self.all_active else torch.where(self.active, values, 0.0)

    def revive(self, members: Tensor) -> None:
        """The members of the (P,) bool mask `members` move again (PBT gave their slots a donor's weights)."""
        self.active |= members.to(self.device)
        self.all_active = False  # `mask` stays exact either way; it only skips a where() when all move
        self.moving_changed()

    def number(self, name: str) -> Tensor:
        """Every member's `name` (one of gdlab.schedules.SCHEDULABLE) as a (P,) tensor."""
        values = getattr(self, name)
        if values is None:
            return torch.zeros(len(self.active), dtype=torch.float64, device=self.device)
        return values

    def set_numbers(self, name: str, values: Tensor) -> None:
        """Every member's `name` (one of gdlab.schedules.SCHEDULABLE, a (P,) tensor) from the next step on."""
        current = getattr(self, name)
        if current is None:  # GD without momentum gets one
            setattr(self, name, values.clone())
        else:
            current.copy_(values)
        self.moving_changed()

    def member_tensors(self) -> list[tuple[Tensor, int]]:
        """(tensor, member axis) of everything a member carries from one step to the next, besides its
        weights and gradients: the per-parameter state (momentum buffers, Adam's moments), and what a
        rule keeps of its own (subclasses add theirs)."""
        return [
            (t, 0)
            for state in self.state.values()
            for t in state.values()
            if isinstance(t, Tensor) and t.dim()
        ]

    @torch.no_grad()
    def copy_members(self, sources: Tensor, targets: Tensor) -> None:
        """Members `targets` take members `sources`' optimizer state (PBT's exploit; index tensors)."""
        for tensor, axis in self.member_tensors():
            tensor.index_copy_(
                axis, targets.to(tensor.device), tensor.index_select(axis, sources.to(tensor.device))
            )


class GD(MemberOptimizer):
    """torch.optim.SGD's update with an lr and a momentum per member: plain, heavy-ball or Nesterov.

    d = g;  heavy-ball: buf = momentum * buf + g (buf = g at the first step), d = buf;
    Nesterov: d = g + momentum * buf;  w = w - lr * d.
    """

    def __init__(self, params, lr: Tensor, momentum: Tensor | None = None, nesterov: bool = False):
        super().__init__(params, len(lr))
        self.lr, self.nesterov = lr, nesterov
        self.momentum = momentum if momentum is not None and bool(momentum.any()) else None
        self.moving_changed()

    def moving_changed(self) -> None:
        # -lr per member, shaped for each parameter once (not every step): these networks are tiny.
        neg_lr = -self.mask(self.lr)
        self.neg_lr = [per_member(neg_lr.to(p), p) for p in self.params]
        self.record_fields = StepRecord.fixed(self.lr, self.active)
        if self.momentum is not None:
            self.mu = [per_member(self.momentum.to(p), p) for p in self.params]

    @torch.no_grad()
    def step(self, closure) -> StepRecord:
        with torch.enable_grad():
            start = closure()
        for i, p in enumerate(self.params):
            d = p.grad
            if self.momentum is not None:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(self.mu[i]).add_(d)
                buf = state["momentum_buffer"]
                d = d + self.mu[i] * buf if self.nesterov else buf
            p.addcmul_(self.neg_lr[i], d)
        return StepRecord(start, *self.record_fields)


class Adam(MemberOptimizer):
    """torch.optim.Adam's update (no weight decay, no amsgrad) with an lr per member.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²;
    w = w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    Elementwise, so a per-member lr is all a population needs.
    """

    def __init__(self, params, lr: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, len(lr))
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.moving_changed()

    def moving_changed(self) -> None:
        self.lr_views = [per_member(self.mask(self.lr).to(p), p) for p in self.params]
        self.record_fields = StepRecord.fixed(self.lr, self.active)

    @torch.no_grad()
    def step(self, closure) -> StepRecord:
        with torch.enable_grad():
            start = closure()
        beta1, beta2 = self.betas
        self.t += 1
        bias1, bias2_sqrt = 1 - beta1**self.t, math.sqrt(1 - beta2**self.t)
        for p, lr in zip(self.params, self.lr_views, strict=True):
            state = self.state[p]
            if not state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.sub_(lr * (m / bias1) / denom)
        return StepRecord(start, *self.record_fields)


def armijo_condition(f_trial: Tensor, f0: Tensor, step: Tensor, grad_sq: Tensor, c: Tensor) -> Tensor:
    """Sufficient decrease, per member: f(w - a*g) <= f(w) - c * a * ||g||^2. A non-finite trial fails."""
    return f_trial.isfinite() & (f_trial <= f0 - c * step * grad_sq)


class Backtracking(MemberOptimizer):
    """Gradient descent with an Armijo backtracking line search, each member searching on its own.

    Each step evaluates f and g at w (forward+backward), then tries w - a*g for a = a0, beta*a0,
    beta^2*a0, ... (forward only) until the Armijo condition holds. Trial points are always assigned
    from a saved copy of w, so no drift accumulates. A member that has accepted stops searching (and
    counting evaluations) while the others go on.

    trial_eval=forward_backward evaluates each trial with its gradient instead, so the accepted
    trial's f and g are the next step's: one forward+backward per step when the first trial passes
    (with reset=grow and a gentle growth), the floor GD has too.
    """

    def __init__(self, params, lr: Tensor, c: Tensor, beta: Tensor, growth: Tensor, lr_max: Tensor,
                 lr_min: Tensor, max_backtracks: Tensor, tiny_step: Tensor, reset: str = "initial",
                 on_failure: str = "revert", trial_eval: str = "forward"):  # fmt: skip
        super().__init__(params, len(lr))
        self.lr, self.c, self.beta, self.growth, self.lr_max = lr, c, beta, growth, lr_max
        self.lr_min, self.max_backtracks, self.tiny_step = lr_min, max_backtracks, tiny_step
        self.reset, self.on_failure, self.reuse = reset, on_failure, trial_eval == "forward_backward"
        self.last_accepted = torch.full_like(lr, math.nan)
        self.carried: Evaluation | None = None  # reuse: the accepted trials' evaluation (NaN: none)

    def member_tensors(self) -> list[tuple[Tensor, int]]:
        carried = [] if self.carried is None else [(t, -1) for t in self.carried.fields() if t is not None]
        return [*super().member_tensors(), (self.last_accepted, 0), *carried]

    def first_trial_step(self, f0: Tensor, grad_sq: Tensor) -> Tensor:
        """The step each search starts at: lr, or from the last accepted step (`reset`)."""
        last = self.last_accepted
        if self.reset == "initial":
            return self.lr.clone()
        rule = last if self.reset == "previous" else torch.minimum(last * self.growth, self.lr_max)
        return torch.where(last.isnan(), self.lr, rule)

    @torch.no_grad()
    def step(self, closure) -> StepRecord:
        record = self.start_record(closure)
        f0, w0 = losses(record.start), [p.detach().clone() for p in self.params]
        neg_g = [-p.grad for p in self.params]
        if self.reuse:  # what the next step starts from, member by member as they accept
            self.next_grads, self.next_start = [p.grad.clone() for p in self.params], record.start
        grad_sq = sum((d * d).flatten(1).sum(dim=1) for d in neg_g).double()
        step = record.trial_step = self.first_trial_step(f0, grad_sq)
        f_ref = self.reference(f0)
        searching, accepted = self.active.clone(), torch.zeros_like(self.active)
        evaluations = record.evals_fwdbwd if self.reuse else record.evals_fwd
        while searching.any():
            self.move(w0, neg_g, step)
            with torch.set_grad_enabled(self.reuse):  # forward_backward: an accepted trial's gradient is kept
                trial = closure()
            f_trial = losses(trial)
            evaluations += searching
            passed = searching & armijo_condition(f_trial, f_ref, step, grad_sq, self.c)
            if self.reuse:
                self.keep_accepted(passed, trial)
            accepted |= passed
            record.loss_after = torch.where(passed, f_trial, record.loss_after)
            searching &= (
                ~passed & (record.backtracks < self.max_backtracks) & (step * self.beta >= self.lr_min)
            )
            step = torch.where(searching, step * self.beta, step)
            record.backtracks += searching

        record.failed = self.active & ~accepted
        self.last_accepted = torch.where(record.failed, torch.maximum(step, self.lr_min), step)
        if record.failed.any():  # a failed trial is not taken: revert to w, or lab 003's tiny step
            step = torch.where(record.failed, self.tiny_step if self.on_failure == "tiny_step" else 0.0, step)
            self.move(w0, neg_g, step)
            revert = f0 if self.on_failure == "revert" else math.nan
            record.loss_after = torch.where(record.failed, revert, record.loss_after)
        if self.reuse:
            self.finish_reuse(record.failed)
        record.step = self.mask(step)
        return record

    def reference(self, f0: Tensor) -> Tensor:
        """The loss a trial must sufficiently decrease from: f(w) (non-monotone rules change it)."""
        return f0

    def start_record(self, closure) -> StepRecord:
        """The step's record, begun with f and g at w: carried over from the last accepted trial
        (trial_eval=forward_backward), or evaluated (every member; a carried one gets the same again)."""
        zeros = torch.zeros(len(self.lr), dtype=torch.float64, device=self.device)
        fresh = self.active if self.carried is None else self.active & losses(self.carried).isnan()
        start = self.carried
        if fresh.any():
            with torch.enable_grad():
                evaluation = closure()
            start = evaluation if start is None else start.where(fresh, evaluation)
        nan = torch.full_like(zeros, math.nan)
        return StepRecord(start, nan, nan, zeros.clone(), nan.clone(), zeros.bool(), zeros.clone(),
                          fresh.double())  # fmt: skip

    def move(self, w0: list[Tensor], neg_g: list[Tensor], step: Tensor) -> None:
        """w = w0 - step * g for every member still training (a retired member stays where it is)."""
        step = self.mask(step).to(w0[0])
        for p, w, d in zip(self.params, w0, neg_g, strict=True):
            torch.addcmul(w, per_member(step, w), d, out=p)

    def keep_accepted(self, passed: Tensor, trial: Evaluation) -> None:
        """trial_eval=forward_backward: keep the gradient and evaluation of the members that just accepted."""
        for kept, p in zip(self.next_grads, self.params, strict=True):
            kept.copy_(torch.where(per_member(passed.to(p.device), p), p.grad, kept))
        self.next_start = self.next_start.where(passed, trial)

    def finish_reuse(self, failed: Tensor) -> None:
        """The accepted trials' f and g start the next step; a failed member is evaluated afresh."""
        for p, kept in zip(self.params, self.next_grads, strict=True):
            p.grad.copy_(kept)
        nan = Evaluation(torch.full_like(self.next_start.loss, math.nan), *self.next_start.fields()[1:])
        self.carried = self.next_start.where(failed, nan)


def losses(evaluation: Evaluation) -> Tensor:
    """The members' losses as float64, on the model's device, where the line search keeps its numbers."""
    return evaluation.loss.detach().to(torch.float64)


class LBFGSStep(MemberOptimizer):
    """torch.optim.LBFGS (strong Wolfe) for a single run: its two-loop recursion couples every
    parameter, so it has no per-member form and trains as P = 1 only."""

    def __init__(self, params, lr: float, max_iter: int, history_size: int):
        super().__init__(params, 1)
        self.lr = member_tensor([lr], self.device)
        self.lbfgs = LBFGS(self.params, lr=lr, max_iter=max_iter, history_size=history_size,
                           line_search_fn="strong_wolfe")  # fmt: skip

    def step(self, closure) -> StepRecord:
        evaluations = []

        def scalar_closure():
            evaluation = closure()
            evaluations.append(evaluation)
            return evaluation.loss.sum()

        self.lbfgs.step(scalar_closure)
        record = StepRecord(evaluations[0], *StepRecord.fixed(self.lr, self.active))
        record.evals_fwdbwd = member_tensor([len(evaluations)], self.device)
        return record
