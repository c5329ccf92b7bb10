"""The per-member rules are torch.optim's updates, member by member, each with its own numbers."""

import pytest
import torch

from gdlab.optimizers import GD, Adam, Evaluation, member_tensor

P, SHAPES = 3, [(4, 5), (1, 5), (5, 2)]  # a stack of P members' parameters (W1, b1, W2)
LRS, MOMENTA = [0.05, 0.3, 0.8], [0.0, 0.5, 0.9]


def loss_of(params, member=None):
    """A smooth non-quadratic loss with a bounded gradient, one per member."""
    total = 0
    for p in params:
        flat = p.flatten(1) if member is None else p.flatten()
        total = total + (torch.log(torch.cosh(flat)) + 0.1 * flat**2).sum(dim=-1)
    return total


def closure_for(params, member=None):
    def closure():
        for p in params:
            p.grad = None
        losses = loss_of(params, member)
        losses.sum().backward()
        return Evaluation(losses.detach())

    return closure


def start_weights():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(P, *shape, dtype=torch.float64, generator=generator) for shape in SHAPES]


@pytest.mark.parametrize(
    ("rule", "reference"),
    [
        ("gd", lambda params, p: torch.optim.SGD(params, lr=LRS[p])),
        ("momentum", lambda params, p: torch.optim.SGD(params, lr=LRS[p], momentum=MOMENTA[p])),
        ("nesterov", lambda params, p: torch.optim.SGD(params, lr=LRS[p], momentum=0.7, nesterov=True)),
        ("adam", lambda params, p: torch.optim.Adam(params, lr=LRS[p])),
    ],
)
def test_each_member_follows_torch_optims_own_update(rule, reference):
    stacked = [w.clone().requires_grad_() for w in start_weights()]
    lr = member_tensor(LRS)
    if rule == "adam":
        optimizer = Adam(stacked, lr)
    else:
        momentum = {"gd": None, "momentum": member_tensor(MOMENTA), "nesterov": member_tensor([0.7] * P)}[
            rule
        ]
        optimizer = GD(stacked, lr, momentum, nesterov=rule == "nesterov")
    for _ in range(25):
        record = optimizer.step(closure_for(stacked))
    assert record.step.tolist() == LRS and record.evals_fwdbwd.tolist() == [1.0] * P
    for p in range(P):
        alone = [w[p].clone().requires_grad_() for w in start_weights()]
        torch_optimizer = reference(alone, p)
        for _ in range(25):
            torch_optimizer.step(lambda alone=alone, p=p: closure_for(alone, p)().loss)
        for mine, theirs in zip(stacked, alone, strict=True):
            torch.testing.assert_close(mine.detach()[p], theirs.detach(), rtol=0, atol=1e-12)


def test_a_retired_member_stops_moving_and_the_others_go_on():
    stacked = [w.clone().requires_grad_() for w in start_weights()]
    optimizer = GD(stacked, member_tensor(LRS))
    optimizer.step(closure_for(stacked))
    frozen = [w.detach()[1].clone() for w in stacked]
    moving = [w.detach()[0].clone() for w in stacked]
    optimizer.retire(torch.tensor([False, True, False]))
    record = optimizer.step(closure_for(stacked))
    assert record.step.tolist() == [LRS[0], 0.0, LRS[2]] and record.evals_fwdbwd.tolist() == [1.0, 0.0, 1.0]
    for w, before in zip(stacked, frozen, strict=True):
        assert torch.equal(w.detach()[1], before)
    assert any(not torch.equal(w.detach()[0], before) for w, before in zip(stacked, moving, strict=True))
