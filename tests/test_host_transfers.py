"""A population's epoch moves the same number of values to the host whatever its size: every per-member
number stays a (P,) tensor on the model's device, and an epoch's rows come over in one transfer.

Counted on the CPU: every call that would move a tensor's data to the host on a GPU (`.item()`, `.cpu()`,
`.tolist()`, `.numpy()`, `.to("cpu")`, and `bool`, `float` or `int` of a tensor), during whole trainings
of P = 4 and P = 512 members. The 512 members are the 4 repeated, so every line search takes as many
trials in both.
"""

from __future__ import annotations

import pytest
import torch
from optuna.distributions import FloatDistribution

import gdlab
from gdlab.pbt_rules import PBTSettings

COUNTED = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")
BASE = ["dataset=moons", "dataset.n_samples=100", "model.depth=2", "model.width=4", "tracking=none"]
LRS = [0.05, 0.3, 1.5, 6.0]
RULES = {
    "gd": ["optimizer=gd"],
    "momentum": ["optimizer=momentum"],
    "adam": ["optimizer=adam"],
    "armijo": ["optimizer=backtracking", "optimizer.lr_max=10"],
    "armijo-reuse": [
        "optimizer=backtracking",
        "optimizer.lr_max=10",
        "optimizer.trial_eval=forward_backward",
        "optimizer.reset=grow",
        "optimizer.growth=1.5",
    ],  # fmt: skip
}


class TransferCount:
    """Counts calls of the COUNTED tensor methods while active (monkeypatched on torch.Tensor)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in COUNTED:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counting(original))
        monkeypatch.setattr(torch.Tensor, "to", self.counting(torch.Tensor.to, only=to_the_host))

    def counting(self, original, only=lambda *args, **kwargs: True):
        def counted(tensor, *args, **kwargs):
            if only(*args, **kwargs):
                self.count += 1
            return original(tensor, *args, **kwargs)

        return counted


def to_the_host(*args, **kwargs) -> bool:
    """Whether a Tensor.to call names the CPU as its device."""
    targets = [*args, kwargs.get("device")]
    return any(str(t) == "cpu" for t in targets if isinstance(t, str | torch.device))


def transfers(monkeypatch, rule: list[str], members: int, epochs: int, pbt: PBTSettings | None = None) -> int:
    population = [{"optimizer.lr": LRS[p % len(LRS)]} for p in range(members)]
    overrides = [*BASE, *rule, f"trainer.max_epochs={epochs}"]
    with monkeypatch.context() as patch:
        counter = TransferCount(patch)
        results = gdlab.run(overrides, population=population, pbt=pbt)
    assert len(results) == members and all(len(r.history) == epochs for r in results)
    return counter.count


@pytest.mark.parametrize("rule", list(RULES))
def test_an_epochs_host_transfers_do_not_grow_with_the_population(monkeypatch, rule):
    counts = {(members, epochs): transfers(monkeypatch, RULES[rule], members, epochs)
              for members in (4, 512) for epochs in (3, 6)}  # fmt: skip
    per_epoch = {members: (counts[members, 6] - counts[members, 3]) / 3 for members in (4, 512)}
    assert per_epoch[4] == per_epoch[512], (rule, counts)
    assert counts[4, 6] == counts[512, 6], (rule, counts)
    assert 1 <= per_epoch[4] <= 40, counts  # a handful a step (the rows, the searches' loops)


def test_pbt_rounds_host_transfers_do_not_grow_with_the_population(monkeypatch):
    settings = PBTSettings(interval=2, fraction=0.25, perturb=(1.2, 0.8), resample_probability=0.0,
                           hyperparameters={"optimizer.lr": FloatDistribution(1e-3, 10.0, log=True)},
                           seed=0)  # fmt: skip
    counts = {(members, epochs): transfers(monkeypatch, RULES["gd"], members, epochs, settings)
              for members in (4, 512) for epochs in (3, 7)}  # fmt: skip
    # epochs 3 -> 7 adds two rounds (at epochs 4 and 6) and four epochs
    assert counts[4, 7] - counts[4, 3] == counts[512, 7] - counts[512, 3], counts
    assert counts[4, 7] == counts[512, 7], counts
