"""Polyak, Barzilai–Borwein and non-monotone Armijo: each step is its formula, each converges on a strongly
convex quadratic at the evaluations it promises, and each trains a population as its members alone."""

import numpy as np
import pytest
import torch

import gdlab
from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.optimizers import Backtracking, Evaluation, member_tensor
from gdlab.step_rules import BarzilaiBorwein, NonMonotone, Polyak

P, N = 3, 6
torch.manual_seed(0)
_M = torch.randn(N, N, dtype=torch.float64)
A = _M @ _M.T + 0.5 * torch.eye(N, dtype=torch.float64)  # symmetric positive definite: strongly convex


def quadratic(w):
    """f(w) = ½ wᵀAw per member (minimum 0 at w = 0)."""
    return 0.5 * torch.einsum("pi,ij,pj->p", w, A, w)


def closure_for(params):
    def closure():
        w = params[0]
        if not torch.is_grad_enabled():
            return Evaluation(quadratic(w))
        w.grad = None
        f = quadratic(w)
        f.sum().backward()
        return Evaluation(f.detach())

    return closure


def start():
    return [torch.linspace(-1, 1, P * N, dtype=torch.float64).reshape(P, N).clone().requires_grad_()]


def test_polyak_step_is_its_formula():
    params, f_star, c, step_max = start(), member_tensor([0.0, 0.1, 0.0]), member_tensor([0.5, 1, 2]), \
        member_tensor([10.0, 10.0, 0.01])  # fmt: skip
    w0 = params[0].detach().clone()
    g, f = w0 @ A, quadratic(w0)
    expected = torch.minimum((f - f_star) / (c * (g * g).sum(dim=1)), step_max)
    record = Polyak(params, f_star, c, step_max).step(closure_for(params))
    assert torch.allclose(record.step, expected, rtol=1e-12, atol=0)
    assert record.step[2] == 0.01  # capped at step_max
    assert torch.allclose(params[0].detach(), w0 - expected[:, None] * g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant", ["bb1", "bb2"])
def test_bb_step_is_its_formula(variant):
    params = start()
    optimizer = BarzilaiBorwein(params, member_tensor([0.05] * P), member_tensor([1e-6] * P),
                                member_tensor([1e3] * P), variant)  # fmt: skip
    first = optimizer.step(closure_for(params))
    assert first.step.tolist() == [0.05] * P  # no iterate pair yet: the first step is lr
    w_start, w1 = start()[0].detach(), params[0].detach().clone()
    s, y = w1 - w_start, (w1 - w_start) @ A  # the gradient of ½ wᵀAw is Aw
    ss, sy, yy = (s * s).sum(1), (s * y).sum(1), (y * y).sum(1)
    expected = ss / sy if variant == "bb1" else sy / yy
    second = optimizer.step(closure_for(params))
    assert torch.allclose(second.step, expected, rtol=1e-12, atol=0)


def test_bb_keeps_the_previous_step_without_positive_curvature_and_clips():
    from gdlab.step_rules import bb_step

    previous, low, high = member_tensor([0.3, 0.3, 0.3]), member_tensor([0.01] * 3), member_tensor([1.0] * 3)
    step = bb_step(member_tensor([1, 1, 1]), member_tensor([-1, 1e-6, 4]), member_tensor([1, 1, 16]), "bb1",
                   previous, low, high)  # fmt: skip
    assert step.tolist() == [0.3, 1.0, 0.25]


def run_to_convergence(optimizer, params, steps=300):
    records = [optimizer.step(closure_for(params)) for _ in range(steps)]
    return records, quadratic(params[0].detach())


@pytest.mark.parametrize("rule", ["polyak", "bb1", "bb2", "nonmonotone"])
def test_each_rule_converges_on_a_strongly_convex_quadratic_at_its_promised_cost(rule):
    params = start()
    ones = lambda v: member_tensor([v] * P)  # noqa: E731
    if rule == "polyak":
        optimizer = Polyak(params, ones(0.0), ones(0.5), ones(1.0))
    elif rule.startswith("bb"):
        optimizer = BarzilaiBorwein(params, ones(0.01), ones(1e-8), ones(1e3), rule)
    else:
        optimizer = NonMonotone(params, 5, "polyak", ones(0.0), ones(0.5), **backtracking_numbers())
    records, f = run_to_convergence(optimizer, params)
    assert (f < 1e-10).all(), f
    fwdbwd = torch.stack([r.evals_fwdbwd for r in records])
    if rule != "nonmonotone":  # one forward+backward per step, nothing else
        assert (fwdbwd == 1).all() and all((r.evals_fwd == 0).all() for r in records)


def backtracking_numbers(**change):
    numbers = dict(lr=1.0, c=1e-4, beta=0.5, growth=2.0, lr_max=10.0, lr_min=1e-10, max_backtracks=50,
                   tiny_step=1e-6)  # fmt: skip
    numbers.update(change)
    return {k: member_tensor([v] * P) for k, v in numbers.items()}


def test_nonmonotone_with_memory_1_is_armijo_exactly():
    armijo_params, nonmono_params = start(), start()
    armijo = Backtracking(armijo_params, **backtracking_numbers(), reset="grow")
    nonmono = NonMonotone(nonmono_params, 1, "rule", member_tensor([0.0] * P), member_tensor([0.5] * P),
                          **backtracking_numbers(), reset="grow")  # fmt: skip
    for _ in range(40):
        a, b = armijo.step(closure_for(armijo_params)), nonmono.step(closure_for(nonmono_params))
        assert torch.equal(a.step, b.step) and torch.equal(a.backtracks, b.backtracks)
    assert torch.equal(armijo_params[0], nonmono_params[0])


def test_nonmonotone_memory_1_trains_the_moons_lab_as_backtracking_does():
    common = ["+experiment=lab_moons_fixed_lr", "trainer.max_epochs=60", "tracking=none"]
    armijo = gdlab.run([*common, "optimizer=backtracking"])
    nonmono = gdlab.run(
        [*common, "optimizer=nonmonotone", "optimizer.memory=1", "optimizer.first_trial=rule"]
    )
    np.testing.assert_allclose(
        nonmono.history["train/loss"], armijo.history["train/loss"], rtol=1e-12, atol=0
    )
    assert nonmono.final["evals"] == armijo.final["evals"]


def test_a_longer_memory_accepts_more_first_trials():
    common = ["+experiment=lab_moons_fixed_lr", "trainer.max_epochs=100", "tracking=none",
              "optimizer=nonmonotone", "optimizer.first_trial=rule", "optimizer.lr=4",
              "optimizer.lr_max=4"]  # fmt: skip
    short, long = gdlab.run([*common, "optimizer.memory=1"]), gdlab.run([*common, "optimizer.memory=10"])
    assert long.history["backtracks"].sum() < short.history["backtracks"].sum()


@pytest.mark.parametrize(
    ("rule", "members"),
    [(["optimizer=polyak"], [{"optimizer.c": 0.5}, {"optimizer.c": 1, "seed": 7}, {"optimizer.step_max": 3}]),
     (["optimizer=bb", "optimizer.variant=bb2"], [{"optimizer.lr": 0.1}, {"optimizer.lr": 1.0}, {"seed": 7}]),
     (["optimizer=nonmonotone", "optimizer.first_trial=polyak", "optimizer.memory=5"],
      [{"optimizer.c": 1e-4}, {"optimizer.c": 0.3}, {"optimizer.lr_max": 2, "seed": 7}])],
)  # fmt: skip
def test_a_population_trains_each_member_as_it_would_alone(rule, members):
    common = ["+experiment=lab_moons_fixed_lr", *rule, "trainer.max_epochs=40", "tracking=none"]
    together = gdlab.run(common, population=members)
    for member, result in zip(members, together, strict=True):
        alone = gdlab.run([*common, *[f"{k}={v}" for k, v in member.items()]])
        np.testing.assert_allclose(
            result.history["train/loss"], alone.history["train/loss"], rtol=1e-8, atol=0
        )
        assert result.final["evals"] == alone.final["evals"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer=polyak", "optimizer.c=-1"], "optimizer.c=-1 is out of range; allowed: a number > 0"),
        (["optimizer=polyak", "optimizer.f_star=nan"], "optimizer.f_star=nan is not allowed"),
        (["optimizer=bb", "optimizer.step_min=2", "optimizer.step_max=1"],
         "optimizer.step_min=2 is more than optimizer.step_max=1"),
        (["optimizer=bb", "optimizer.variant=bb3"], "choose one of bb1|bb2"),
        (["optimizer=nonmonotone", "optimizer.memory=0"], "optimizer.memory=0 is out of range"),
        (["optimizer=nonmonotone", "optimizer.first_trial=x"], "choose one of rule|polyak"),
    ],
)  # fmt: skip
def test_bad_numbers_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("rule", ["optimizer=polyak", "optimizer=bb", "optimizer=nonmonotone"])
def test_hand_written_gradients_train_each_rule_as_autograd_does(rule):
    common = ["+experiment=lab_moons_fixed_lr", rule, "trainer.max_epochs=30", "tracking=none"]
    autograd, manual = gdlab.run(common), gdlab.run([*common, "backprop=manual"])
    np.testing.assert_allclose(manual.history["train/loss"], autograd.history["train/loss"], rtol=1e-10)
    np.testing.assert_allclose(manual.history["step"], autograd.history["step"], rtol=1e-8)


def test_nonmonotone_below_f_star_starts_from_its_rule_not_a_zero_step():
    params = start()
    optimizer = NonMonotone(params, 3, "polyak", member_tensor([1e9] * P), member_tensor([0.5] * P),
                            **backtracking_numbers(lr=0.25), reset="initial")  # fmt: skip
    record = optimizer.step(closure_for(params))
    assert record.trial_step.tolist() == [0.25] * P and (record.step > 0).all()
