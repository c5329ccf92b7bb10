"""Replicates: one configuration trained k times, with seeds seed, seed+1, ..., seed+k-1.

The seed draws the initial weights and orders mini-batches; the split is the dataset's own
(`dataset.random_state`) and stays fixed, so replicates differ only in what a seed decides. They train as
k members of one population (`Population.replicated`), and what their k values say is summarized here: the
aggregate a sweep ranks on (`gdlab_sweep.aggregate`), the mean, the standard deviation and a 95% interval
for the mean (Student's t, k - 1 degrees of freedom).

Light on purpose (numpy and scipy's t quantile): gdlab-sweep summarizes trials without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

AGGREGATES = ("mean", "median", "worst")


def aggregate(values: Sequence[float], how: str, direction: str) -> float:
    """The one number a sweep ranks replicates by: their mean, median, or worst value (the highest for
    `direction` minimize). NaN when any replicate has none (it diverged): an unstable configuration."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate={how!r}; choose one of {'|'.join(AGGREGATES)}")
    array = np.asarray(values, dtype=np.float64)
    if not len(array) or not np.isfinite(array).all():
        return math.nan
    if how == "mean":
        return float(array.mean())
    if how == "median":
        return float(np.median(array))
    return float(array.max() if direction == "minimize" else array.min())


@dataclass
class Summary:
    """k replicate values: mean, sample standard deviation and a 95% t interval for the mean (NaN for the
    spread and the interval of a single value)."""

    values: list[float]
    mean: float
    std: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"values": self.values, "mean": self.mean, "std": self.std, "ci95": [self.low, self.high]}


def summarize(values: Sequence[float]) -> Summary:
    array = np.asarray(values, dtype=np.float64)
    k = len(array)
    mean = float(array.mean()) if k else math.nan
    if k < 2 or not np.isfinite(array).all():
        return Summary([float(v) for v in array], mean, math.nan, math.nan, math.nan)
    from scipy.stats import t

    std = float(array.std(ddof=1))
    half = float(t.ppf(0.975, k - 1)) * std / math.sqrt(k)
    return Summary([float(v) for v in array], mean, std, mean - half, mean + half)


@dataclass
class ReplicatedResult:
    """`gdlab.run(..., replicates=k)`'s result for one configuration: its k runs (seed, seed+1, ...), their
    objectives, and their summary."""

    runs: list = field(repr=False)  # RunResult per replicate, in seed order
    seeds: list[int]
    values: list[float]  # each replicate's final objective
    summary: Summary

    @classmethod
    def of(cls, runs: list, seeds: list[int]) -> ReplicatedResult:
        values = [float(run.final["objective"]) for run in runs]
        return cls(runs, list(seeds), values, summarize(values))

    @property
    def mean(self) -> float:
        return self.summary.mean

    @property
    def std(self) -> float:
        return self.summary.std

    @property
    def interval(self) -> tuple[float, float]:
        return self.summary.low, self.summary.high
