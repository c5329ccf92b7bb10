"""A run's data as MLflow datasets, the UI's Dataset column: one per split the run trains on, selects on
and is tested on (input contexts train, val, test), built with `mlflow.data.from_numpy` from the arrays it
trains on. Runs on the same rows share a digest; members of a population share the entities (one per
split and fold, not one per member).

A single run logs its inputs itself (`MlflowClient.log_inputs`); a population member's go through the
metric writer, which makes them from the arrays (gdlab.dataset_entities), so training never waits on the
store and this process never imports MLflow for them.
"""

from __future__ import annotations

import uuid

import numpy as np
from omegaconf import DictConfig

from gdlab.data import Dataset, Split
from gdlab.dataset_entities import dataset_dicts


def dataset_name(dataset: DictConfig) -> str:
    """moons-n500-noise0.2-rs42: what generates the rows (a split is the context, the rows the digest)."""
    parts = [str(dataset.name)]
    if dataset.name == "xor":
        parts.append(f"x{dataset.repeats}")
    elif dataset.get("n_samples") is not None:
        parts.append(f"n{dataset.n_samples}")
    if dataset.get("noise"):
        parts.append(f"noise{dataset.noise:g}")
    parts.append(f"rs{dataset.random_state}")
    return "-".join(parts)


def split_arrays(split: Split, member: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A split's features (as trained on: standardized) and class labels, for one member where each has
    its own rows (k-fold weights) or its own standardization."""
    X, y, rows = split.X, split.y, slice(None)
    if X.dim() == 3:
        X = X[member or 0]
    if split.weights is not None:
        rows = (split.weights[member or 0, :, 0] > 0).numpy()
    return X.numpy()[rows], np.asarray(y)[rows]


class RunInputs:
    """The MLflow datasets of a population's members, made once per distinct set of rows, as plain dicts
    (MLflow's `Dataset.to_dict()` and the input's context, gdlab.dataset_entities.dataset_dicts). Where the
    metric writer records a member's run, the writer makes them from the arrays (`rows_of`), sent once per
    set of rows: this process never imports MLflow for them."""

    def __init__(self, dataset: DictConfig, data: Dataset, folds: list[int] | None):
        self.name, self.data, self.folds = dataset_name(dataset), data, folds
        self.id = uuid.uuid4().hex  # these rows' sets, apart from another batch's on the same writer
        self._made: dict = {}

    def key(self, member: int) -> str:
        """Which set of rows member `member` has (one per fold), unique on a writer."""
        return f"{self.id}/{None if self.folds is None else self.folds[member]}"

    def of_member(self, member: int) -> list[dict]:
        """Member `member`'s datasets: train, val, test (those that exist)."""
        key = self.key(member)
        if key not in self._made:
            self._made[key] = dataset_dicts(self.name, self.rows_of(member))
        return self._made[key]

    def rows_of(self, member: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Member `member`'s splits as (context, features, targets)."""
        splits = {"train": self.data.train, **self.data.evaluation_splits()}
        fold_member = member if self.folds is not None else None
        return [(context, *split_arrays(split, fold_member)) for context, split in splits.items()]
