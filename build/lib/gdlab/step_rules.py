"""Step sizes read off the iterates: Polyak, Barzilai–Borwein, and non-monotone Armijo.

Each rule in its per-member form, like those in gdlab.optimizers: every number is a (P,) tensor and
member p moves exactly as it would alone. Polyak and BB take one forward+backward evaluation per step,
as GD does; non-monotone Armijo searches like Armijo, against the worst of the last few losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gdlab.model import per_member
from gdlab.optimizers import Backtracking, MemberOptimizer, StepRecord, losses

BB_VARIANTS = ("bb1", "bb2")
FIRST_TRIALS = ("rule", "polyak")


def polyak_step(f: Tensor, f_star: Tensor, grad_sq: Tensor, c: Tensor, step_max: Tensor) -> Tensor:
    """SPS_max (Loizou et al. 2021): min((f(w) - f*) / (c ||g||²), step_max), and never negative.
    Where g = 0 there is no direction to move in: step_max (the move is zero)."""
    ratio = (f - f_star) / (c * grad_sq)
    return torch.where(grad_sq > 0, torch.minimum(ratio, step_max), step_max).clamp(min=0.0)


def bb_step(s_dot_s: Tensor, s_dot_y: Tensor, y_dot_y: Tensor, variant: str, previous: Tensor,
            step_min: Tensor, step_max: Tensor) -> Tensor:  # fmt: skip
    """Barzilai–Borwein (1988), s = w_k - w_{k-1}, y = g_k - g_{k-1}: BB1 = sᵀs / sᵀy, BB2 = sᵀy / yᵀy,
    kept in [step_min, step_max]. Where sᵀy <= 0 the loss is not convex along s and neither quotient
    is a step (it would be negative or infinite): the previous step is kept."""
    raw = s_dot_s / s_dot_y if variant == "bb1" else s_dot_y / y_dot_y
    return torch.where(s_dot_y > 0, raw.clamp(step_min, step_max), previous)


def member_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ over every parameter of a·b, per member: (P,) float64 on the parameters' device."""
    return sum((x * y).flatten(1).sum(dim=1) for x, y in zip(a, b, strict=True)).double()


class GradientStep(MemberOptimizer):
    """A rule that evaluates f and g at w once and steps w - step * g with a step per member."""

    def step_size(self, f: Tensor, grads: list[Tensor]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure) -> StepRecord:
        with torch.enable_grad():
            start = closure()
        grads = [p.grad for p in self.params]
        step = self.mask(self.step_size(losses(start), grads))
        for p, g in zip(self.params, grads, strict=True):
            p.addcmul_(per_member(-step.to(p), p), g)
        zeros = torch.zeros_like(step)
        return StepRecord(start, step, step, zeros, torch.full_like(step, torch.nan), zeros.bool(), zeros,
                          self.active.double())  # fmt: skip


class Polyak(GradientStep):
    """The stochastic Polyak step, SPS_max: the step that would reach f* if f were linear along -g."""

    def __init__(self, params, f_star: Tensor, c: Tensor, step_max: Tensor):
        super().__init__(params, len(c))
        self.f_star, self.c, self.step_max = f_star, c, step_max

    def step_size(self, f: Tensor, grads: list[Tensor]) -> Tensor:
        return polyak_step(f, self.f_star, member_dot(grads, grads), self.c, self.step_max)


class BarzilaiBorwein(GradientStep):
    """Gradient descent with the Barzilai–Borwein step; the first step is `lr`."""

    def __init__(self, params, lr: Tensor, step_min: Tensor, step_max: Tensor, variant: str = "bb1"):
        super().__init__(params, len(lr))
        self.current, self.step_min, self.step_max, self.variant = lr.clone(), step_min, step_max, variant
        self.last_w: list[Tensor] | None = None
        self.last_g: list[Tensor] | None = None

    def member_tensors(self) -> list[tuple[Tensor, int]]:
        pairs = [] if self.last_w is None else [(t, 0) for t in (*self.last_w, *self.last_g)]
        return [*super().member_tensors(), (self.current, 0), *pairs]

    def step_size(self, f: Tensor, grads: list[Tensor]) -> Tensor:
        if self.last_w is not None:
            s = [p - w for p, w in zip(self.params, self.last_w, strict=True)]
            y = [g - h for g, h in zip(grads, self.last_g, strict=True)]
            self.current = bb_step(member_dot(s, s), member_dot(s, y), member_dot(y, y), self.variant,
                                   self.current, self.step_min, self.step_max)  # fmt: skip
        self.last_w = [p.detach().clone() for p in self.params]
        self.last_g = [g.clone() for g in grads]
        return self.current


class NonMonotone(Backtracking):
    """Armijo backtracking against the largest of the last `memory` losses (Grippo, Lampariello and
    Lucidi 1986) instead of f(w): a step may raise the loss a little, so fewer trials are shrunk.
    memory = 1 is Armijo exactly. first_trial=polyak starts each search at the Polyak step (capped at
    lr_max), as PoNoS does (Galli et al. 2023); first_trial=rule uses backtracking's `reset` rule."""

    def __init__(self, params, memory: int, first_trial: str, f_star: Tensor, c_step: Tensor, **backtracking):
        super().__init__(params, **backtracking)
        self.first_trial, self.f_star, self.c_step = first_trial, f_star, c_step
        self.recent = torch.full(
            (memory, len(self.lr)), -torch.inf, dtype=torch.float64, device=self.device
        )  # the last losses

    def member_tensors(self) -> list[tuple[Tensor, int]]:
        return [*super().member_tensors(), (self.recent, -1)]

    def reference(self, f0: Tensor) -> Tensor:
        self.recent = torch.cat([self.recent[1:], f0.unsqueeze(0)])
        return self.recent.max(dim=0).values

    def first_trial_step(self, f0: Tensor, grad_sq: Tensor) -> Tensor:
        rule = super().first_trial_step(f0, grad_sq)
        if self.first_trial == "rule":
            return rule
        polyak = polyak_step(f0, self.f_star, grad_sq, self.c_step, self.lr_max)
        return torch.where(polyak > 0, polyak, rule)  # at or below f_star the Polyak step is 0: use the rule
