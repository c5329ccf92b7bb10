"""Armijo backtracking on problems whose answers are known."""

import math

import pytest
import torch

from gdlab.optimizers import Backtracking, Evaluation, armijo_condition, member_tensor

A = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)  # f(w) = 1/2 sum A w^2, L = 100
DEFAULTS = dict(lr=1.0, c=1e-4, beta=0.5, growth=2.0, lr_max=10.0, lr_min=1e-10, max_backtracks=50,
                tiny_step=1e-6)  # fmt: skip


def quadratic_closure(w, f=None):
    """The closure convention on one member (w has shape (1, 3)): an Evaluation of f, with grad or not."""
    f = f or (lambda w: 0.5 * (A * w * w).sum(dim=-1))

    def closure():
        if torch.is_grad_enabled():
            w.grad = None
            loss = f(w)
            loss.sum().backward()
            return Evaluation(loss.detach())
        return Evaluation(f(w))

    return closure


class Single:
    """One member's Backtracking with a scalar view of its step record, as the labs would read it."""

    def __init__(self, w, **kwargs):
        numbers = {k: member_tensor([kwargs.pop(k, v)]) for k, v in DEFAULTS.items()}
        self.opt = Backtracking([w], **numbers, **kwargs)
        self.last_step: dict = {}

    def step(self, closure) -> float:
        record = self.opt.step(closure)
        self.last_step = dict(trial_step=float(record.trial_step[0]), step=float(record.step[0]),
                              backtracks=int(record.backtracks[0]), loss_after=float(record.loss_after[0]),
                              failed=bool(record.failed[0]))  # fmt: skip
        return float(record.start.loss[0])

    @property
    def last_accepted(self) -> float:
        return float(self.opt.last_accepted[0])


def make(lr=1.0, **kwargs):
    w = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    return w, Single(w, lr=lr, **kwargs)


def check(f_trial, f0, step, grad_sq, c) -> bool:
    as_tensor = lambda x: torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    return bool(armijo_condition(*map(as_tensor, (f_trial, f0, step, grad_sq, c)))[0])


def test_accepted_step_satisfies_armijo_and_loss_decreases_every_step():
    w, opt = make(lr=1.0, c=1e-4, beta=0.5)
    closure = quadratic_closure(w)
    f_start = previous = closure().loss.item()
    for _ in range(50):
        g = (A * w.detach())[0]
        f0 = opt.step(closure)
        rec = opt.last_step
        assert f0 == pytest.approx(previous, abs=1e-15)
        assert not rec["failed"]
        assert check(rec["loss_after"], f0, rec["step"], float((g * g).sum()), 1e-4)
        assert rec["loss_after"] < f0
        previous = rec["loss_after"]
    assert previous < 0.1 * f_start


def test_too_large_trial_step_shrinks_to_the_first_armijo_point():
    w, opt = make(lr=1.0, c=1e-4, beta=0.5)
    w0 = w.detach().clone()
    g = A * w0
    f0 = float(0.5 * (A * w0 * w0).sum())
    opt.step(quadratic_closure(w))
    rec = opt.last_step
    # The accepted step is the largest of 1, 1/2, 1/4, ... meeting the condition.
    expected, k = 1.0, 0
    while True:
        f_trial = float(0.5 * (A * (w0 - expected * g) ** 2).sum())
        if check(f_trial, f0, expected, float((g * g).sum()), 1e-4):
            break
        expected, k = expected * 0.5, k + 1
    assert rec["step"] == expected and rec["backtracks"] == k and k > 0
    assert rec["trial_step"] == 1.0
    torch.testing.assert_close(w.detach(), w0 - expected * g, rtol=0, atol=0)
    assert check(rec["loss_after"], f0, rec["step"], float((g * g).sum()), 1e-4)


def test_reset_rules_pick_the_first_trial_step():
    for reset, expected in [("initial", 1.0), ("previous", None), ("grow", None)]:
        w, opt = make(lr=1.0, reset=reset, growth=2.0, lr_max=5.0)
        closure = quadratic_closure(w)
        opt.step(closure)
        accepted = opt.last_step["step"]
        opt.step(closure)
        trial = opt.last_step["trial_step"]
        if reset == "initial":
            assert trial == expected
        elif reset == "previous":
            assert trial == accepted
        else:
            assert trial == min(accepted * 2.0, 5.0)


def test_failure_reverts_and_never_stores_a_zero_step():
    w, opt = make(lr=1.0, beta=0.5, max_backtracks=2)  # 1, 1/2, 1/4 all overshoot on A=100
    w0 = w.detach().clone()
    f0 = opt.step(quadratic_closure(w))
    rec = opt.last_step
    assert rec["failed"] and rec["backtracks"] == 2 and rec["step"] == 0.0
    assert rec["loss_after"] == f0
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=0)
    assert opt.last_accepted == 0.25 > 0


def test_tiny_step_fallback_moves_by_the_tiny_step():
    w, opt = make(lr=1.0, max_backtracks=0, on_failure="tiny_step", tiny_step=1e-6)
    w0 = w.detach().clone()
    opt.step(quadratic_closure(w))
    assert opt.last_step["failed"] and opt.last_step["step"] == 1e-6
    torch.testing.assert_close(w.detach(), w0 - 1e-6 * A * w0, rtol=0, atol=1e-15)


def test_non_finite_trial_loss_is_a_failed_test_not_an_acceptance():
    def f(w):  # NaN once the step overshoots past |w| > 2: a NaN must never pass Armijo
        value = 0.5 * (A * w * w).sum(dim=-1)
        return value if float(w.detach().abs().max()) < 2 else value * math.nan

    w, opt = make(lr=1.0, beta=0.5)
    opt.step(quadratic_closure(w, f))
    rec = opt.last_step
    assert not rec["failed"] and rec["backtracks"] > 0
    assert math.isfinite(rec["loss_after"])
    assert float(w.detach().abs().max()) < 2


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_armijo_condition_rejects_non_finite(value):
    assert not check(value, 1.0, 0.1, 1.0, 1e-4)
    assert check(0.5, 1.0, 0.1, 1.0, 1e-4)
    assert not check(0.99999, 1.0, 1.0, 1.0, 0.1)


def test_forward_backward_trials_reuse_the_accepted_gradient_and_take_the_same_path():
    paths, counts = {}, {}
    for trial_eval in ("forward", "forward_backward"):
        w, opt = make(lr=1.0, c=1e-4, beta=0.5, trial_eval=trial_eval)
        calls = {"fwd": 0, "fwdbwd": 0}
        inner = quadratic_closure(w)

        def closure(inner=inner, calls=calls):
            calls["fwdbwd" if torch.is_grad_enabled() else "fwd"] += 1
            return inner()

        steps = []
        for _ in range(20):
            opt.step(closure)
            steps.append((opt.last_step["step"], opt.last_step["backtracks"], opt.last_step["loss_after"]))
        paths[trial_eval], counts[trial_eval] = steps, calls
    assert paths["forward_backward"] == paths["forward"]  # the same accepted points, bit for bit
    trials = sum(backtracks + 1 for _, backtracks, _ in paths["forward"])
    assert counts["forward"] == {"fwd": trials, "fwdbwd": 20}
    assert counts["forward_backward"] == {"fwd": 0, "fwdbwd": trials + 1}  # only step 0 evaluates w itself
