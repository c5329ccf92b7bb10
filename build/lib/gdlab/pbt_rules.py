"""Population Based Training's settings and its rules, each in one short function: who is top and bottom
(`quantile_size`, `ranked`) and how a copied value is explored (`explore`: perturb or resample, inside the
search space). Light on purpose (no torch, no Optuna import): gdlab-sweep checks a sweep file with it.
The training side is gdlab.pbt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna.distributions import FloatDistribution


@dataclass(frozen=True)
class PBTSettings:
    """A sweep file's gdlab_sweep.pbt block, checked (gdlab.sweep.spec); the defaults are Ray Tune's."""

    hyperparameters: dict[str, FloatDistribution]  # config key (optimizer.lr) -> its search space
    interval: int = 10  # epochs between exploit/explore rounds
    fraction: float = 0.25  # the top and bottom quantile, in [0, 0.5]; 0 turns PBT off
    perturb: tuple[float, ...] = (1.2, 0.8)  # factors a kept value is multiplied by
    resample_probability: float = 0.25  # chance a value is drawn anew from the search space instead
    seed: int = 0

    @property
    def numbers(self) -> list[str]:
        """The optimizer numbers PBT changes (lr for optimizer.lr)."""
        return [key.removeprefix("optimizer.") for key in self.hyperparameters]

    def describe(self) -> dict:
        return {"interval": self.interval, "fraction": self.fraction, "perturb": list(self.perturb),
                "resample_probability": self.resample_probability, "seed": self.seed,
                "hyperparameters": {k: repr(d) for k, d in self.hyperparameters.items()}}  # fmt: skip


def settings_problem(interval, fraction, perturb, resample_probability, seed) -> str | None:
    """The first PBT setting outside what is allowed, as "key=value ... allowed" (None: all fine). Shared by
    a sweep file's gdlab_sweep.pbt block and gdlab.run(pbt=...)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        return f"interval={interval!r} must be an integer >= 1 (epochs between exploits)"
    for key, value, high in (
        ("fraction", fraction, 0.5),
        ("resample_probability", resample_probability, 1.0),
    ):
        if not finite_number(value) or not 0 <= value <= high:
            return f"{key}={value!r} is not allowed; use a number in [0, {high:g}]"
    if isinstance(perturb, str) or not hasattr(perturb, "__len__") or not len(perturb):
        shown = list(perturb) if isinstance(perturb, tuple) else perturb
        return f"perturb={shown!r} must be a non-empty list of factors > 0, e.g. [1.2, 0.8]"
    for i, factor in enumerate(perturb):
        if not finite_number(factor) or factor <= 0:
            return f"perturb.{i}={factor!r} is not allowed; use a number > 0"
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        return f"seed={seed!r} must be an integer >= 0"
    return None


def finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def quantile_size(n_ranked: int, fraction: float) -> int:
    """How many members are top (and bottom): Ray's ceil(n * fraction), at most half."""
    return min(math.ceil(n_ranked * fraction), n_ranked // 2)


def ranked(values: dict[int, float], direction: str) -> list[int]:
    """Members best first by `values`; a NaN/inf objective ranks last, ties by member."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(p: int) -> tuple:
        value = values[p]
        return (0, sign * value, p) if math.isfinite(value) else (1, 0.0, p)

    return sorted(values, key=key)


def clip(value: float, distribution: FloatDistribution) -> float:
    if distribution.step is not None:
        value = distribution.low + round((value - distribution.low) / distribution.step) * distribution.step
    return min(max(value, distribution.low), distribution.high)


def draw(distribution: FloatDistribution, rng: random.Random) -> float:
    """A value from the search space's distribution (log-uniform where it is log)."""
    low, high = distribution.low, distribution.high
    if distribution.log:
        return clip(math.exp(rng.uniform(math.log(low), math.log(high))), distribution)
    return clip(rng.uniform(low, high), distribution)


def explore(value: float, distribution: FloatDistribution, settings: PBTSettings,
            rng: random.Random) -> tuple[float, str]:  # fmt: skip
    """(new value, how): resampled, or perturbed by a factor; always inside the search space."""
    if rng.random() < settings.resample_probability:
        return draw(distribution, rng), "resampled"
    factor = rng.choice(settings.perturb)
    return clip(value * factor, distribution), f"x{factor:g}"
