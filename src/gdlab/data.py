"""Datasets (all offline) and loaders that hand ready tensors to the training step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

N_CLASSES = {"xor": 2, "moons": 2, "circles": 2, "digits": 10}
N_FEATURES = {"xor": 2, "moons": 2, "circles": 2, "digits": 64}
DIGITS_ROWS = 1797
XOR_POINTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_LABELS = np.array([0, 1, 1, 0])


@dataclass
class Split:
    X: Tensor  # (N, n_features)
    T: Tensor  # targets shaped like the logits (see model.encode_targets)
    y: np.ndarray  # class indices, for plots and reports

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split | None
    n_features: int
    n_classes: int


def make_arrays(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The raw (X, y) of a dataset config, before splitting."""
    rng = np.random.default_rng(cfg.random_state)
    if cfg.name == "xor":
        X = np.tile(XOR_POINTS, (cfg.repeats, 1))
        y = np.tile(XOR_LABELS, cfg.repeats)
        if cfg.noise:
            X = X + rng.normal(scale=cfg.noise, size=X.shape)
        return X, y
    from sklearn.datasets import load_digits, make_circles, make_moons  # ~0.5 s: only where a run needs it

    if cfg.name == "moons":
        return make_moons(n_samples=cfg.n_samples, noise=cfg.noise, random_state=cfg.random_state)
    if cfg.name == "circles":
        return make_circles(
            n_samples=cfg.n_samples,
            noise=cfg.noise,
            factor=cfg.get("factor", 0.5),
            random_state=cfg.random_state,
        )
    if cfg.name == "digits":
        X, y = load_digits(return_X_y=True)
        if cfg.n_samples:
            keep = rng.permutation(len(X))[: cfg.n_samples]
            X, y = X[keep], y[keep]
        return X, y
    raise ValueError(f"unknown dataset {cfg.name!r}")


def load_dataset(cfg, encode_targets, dtype: torch.dtype) -> Dataset:
    """Build, split (test_size 0: no test split) and standardize on the train split only."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = make_arrays(cfg)
    if cfg.test_size > 0:
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=cfg.test_size, random_state=cfg.random_state
        )
    else:
        X_train, y_train, X_test, y_test = X, y, None, None
    if cfg.standardize:
        scaler = StandardScaler().fit(X_train)
        X_train = scaler.transform(X_train)
        X_test = scaler.transform(X_test) if X_test is not None else None

    def split(X_part, y_part) -> Split:
        labels = torch.as_tensor(y_part, dtype=torch.long)
        return Split(torch.as_tensor(X_part, dtype=dtype), encode_targets(labels, dtype), y_part)

    return Dataset(
        name=cfg.name,
        train=split(X_train, y_train),
        test=split(X_test, y_test) if X_test is not None else None,
        n_features=X.shape[1],
        n_classes=N_CLASSES[cfg.name],
    )


class FullBatch:
    """One batch per epoch: the whole split, as it is (no per-row collation)."""

    def __init__(self, split: Split):
        self.batch = (split.X, split.T)

    def __iter__(self):
        yield self.batch

    def __len__(self) -> int:
        return 1


class ShuffledBatches:
    """Mini-batches by slicing a fresh permutation each epoch (no per-row collation)."""

    def __init__(self, split: Split, batch_size: int, seed: int):
        self.X, self.T, self.batch_size = split.X, split.T, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.X), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.X[idx], self.T[idx]

    def __len__(self) -> int:
        return -(-len(self.X) // self.batch_size)


def make_loader(split: Split, batch_size: int | None, seed: int):
    if batch_size is None or batch_size >= len(split):
        return FullBatch(split)
    return ShuffledBatches(split, batch_size, seed)
