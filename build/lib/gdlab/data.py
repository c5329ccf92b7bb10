"""Datasets (all offline) and loaders that hand ready tensors to the training step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

N_CLASSES = {"xor": 2, "moons": 2, "circles": 2, "digits": 10}
N_FEATURES = {"xor": 2, "moons": 2, "circles": 2, "digits": 64}
DIGITS_ROWS = 1797
XOR_POINTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_LABELS = np.array([0, 1, 1, 0])
# Each split's loss and accuracy, as history, final and MLflow name them: train/loss, ..., test/acc.
SPLIT_METRICS = tuple(f"{split}/{metric}" for split in ("train", "val", "test") for metric in ("loss", "acc"))


@dataclass
class Split:
    X: Tensor  # (N, n_features); (P, N, n_features) when each member standardizes on its own rows
    T: Tensor  # targets shaped like the logits (see model.encode_targets)
    y: np.ndarray  # class indices, for plots and reports
    weights: Tensor | None = None  # (P, N, 1): each member's rows, summing to 1 (k-fold); None: all rows

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split | None  # dataset.val_size > 0: the rows a sweep selects on
    test: Split | None  # dataset.test_size > 0: the rows a sweep's result is measured on, once
    n_features: int
    n_classes: int

    def evaluation_splits(self) -> dict[str, Split]:
        """The held-out splits a run measures each epoch, by name: val, test (those that exist)."""
        return {name: split for name, split in (("val", self.val), ("test", self.test)) if split is not None}


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


def split_rows(cfg, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices: the test part is split off first, exactly as without a validation
    split (so test rows never depend on dataset.val_size), then the validation part from what is left.
    Both sizes are fractions of all rows, rounded up as scikit-learn rounds a test_size."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    rest, test = non_test_rows(cfg, len(y))
    train, val = rest, rows[:0]
    if cfg.get("cv_folds"):  # fold cv_fold of the non-test rows validates, the others train
        train_folds, val_folds = fold_rows(cfg, rest, y)
        return train_folds[cfg.cv_fold], val_folds[cfg.cv_fold], test
    val_size = cfg.get("val_size") or 0
    if val_size > 0:
        n_val = math.ceil(val_size * len(rows))
        train, val = train_test_split(rest, test_size=n_val, random_state=cfg.random_state)
    return train, val, test


def non_test_rows(cfg, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rows outside the test split, the test rows): the test part split off first."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(n_rows)
    if cfg.test_size > 0:
        return tuple(train_test_split(rows, test_size=cfg.test_size, random_state=cfg.random_state))
    return rows, rows[:0]


def fold_rows(cfg, rest: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training rows, validation rows) of each of cfg.cv_folds folds of the non-test rows `rest`:
    scikit-learn's StratifiedKFold where every class has a row in each fold, else KFold; shuffled with
    cfg.random_state. The folds are disjoint and together are `rest`."""
    from sklearn.model_selection import KFold, StratifiedKFold

    _, counts = np.unique(y[rest], return_counts=True)
    stratify = counts.min() >= cfg.cv_folds
    kind = StratifiedKFold if stratify else KFold
    splitter = kind(n_splits=cfg.cv_folds, shuffle=True, random_state=cfg.random_state)
    pairs = list(splitter.split(rest, y[rest]))
    return [rest[train] for train, _ in pairs], [rest[val] for _, val in pairs]


def load_dataset(cfg, encode_targets, dtype: torch.dtype) -> Dataset:
    """Build, split into train/val/test (a size of 0: no such split) and standardize on the train rows."""
    from sklearn.preprocessing import StandardScaler

    X, y = make_arrays(cfg)
    train, val, test = split_rows(cfg, y)
    scale = StandardScaler().fit(X[train]).transform if cfg.standardize else lambda part: part

    def split(rows) -> Split | None:
        if len(rows) == 0:
            return None
        labels = torch.as_tensor(y[rows], dtype=torch.long)
        return Split(torch.as_tensor(scale(X[rows]), dtype=dtype), encode_targets(labels, dtype), y[rows])

    return Dataset(
        name=cfg.name,
        train=split(train),
        val=split(val),
        test=split(test),
        n_features=X.shape[1],
        n_classes=N_CLASSES[cfg.name],
    )


def load_folds(cfg, folds: list[int], encode_targets, dtype: torch.dtype) -> Dataset:
    """A population whose members validate on different folds (member p on fold `folds[p]`), as one
    dataset: every non-test row once, in `train` and in `val`, with weights that give member p's loss
    its training rows and its validation metrics its fold; X standardized per member on its own training
    rows, exactly as `load_dataset` does for that member alone."""
    from sklearn.preprocessing import StandardScaler

    X, y = make_arrays(cfg)
    train, test = non_test_rows(cfg, len(y))
    train_folds, val_folds = fold_rows(cfg, train, y)
    members = torch.as_tensor(folds)

    def member_rows(rows_of_fold: list[np.ndarray]) -> Tensor:
        weights = np.zeros((len(rows_of_fold), len(train), 1))  # one per fold, then one per member
        for fold, rows in enumerate(rows_of_fold):
            weights[fold, np.isin(train, rows)] = 1.0 / len(rows)
        return torch.as_tensor(weights, dtype=dtype)[members]

    def scaled(rows) -> Tensor:
        per_fold = []
        for fold_train in train_folds:
            part = StandardScaler().fit(X[fold_train]).transform(X[rows]) if cfg.standardize else X[rows]
            per_fold.append(torch.as_tensor(part, dtype=dtype))
        return torch.stack(per_fold)[members]  # (P, N, n_features)

    def targets(rows) -> Tensor:
        return encode_targets(torch.as_tensor(y[rows], dtype=torch.long), dtype)

    X_train = scaled(train)
    return Dataset(
        name=cfg.name,
        train=Split(X_train, targets(train), y[train], member_rows(train_folds)),
        val=Split(X_train, targets(train), y[train], member_rows(val_folds)),
        test=Split(scaled(test), targets(test), y[test]) if len(test) else None,
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
