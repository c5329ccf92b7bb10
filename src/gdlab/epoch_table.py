"""A population's history as one table: per epoch, every member's row as a column of an (n_columns, P)
array, and which members have a row in it. `TrainingModule` appends to it; records, history files and the
metric pipe read it in bulk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

STEP_COLUMNS = ("loss_before", "loss_after", "trial_step", "step", "backtracks", "ls_failed", "ls_failures",
                "evals/fwd", "evals/fwdbwd", "evals/total", "time")  # fmt: skip
INTEGER_COLUMNS = frozenset(("epoch", "backtracks", "ls_failed", "ls_failures", "evals/fwd", "evals/fwdbwd",
                             "evals/total"))  # fmt: skip


class EpochTable:
    """A population's history as columns: per epoch, an (n_columns, P) array of every member's row and
    which members have a row in it (those still training; a PBT-revived member has a gap)."""

    def __init__(self, names: list[str], n_members: int):
        self.names, self.n_members = names, n_members
        self.index = {name: i for i, name in enumerate(names)}
        self.integer_positions = [i for i, name in enumerate(names) if name in INTEGER_COLUMNS]
        self.last_values: tuple = (None, None, None)  # (block, member, values) of `values`' last answer
        self.blocks: list[np.ndarray] = []
        self.recorded: list[np.ndarray] = []

    def append(self, values: np.ndarray, recorded: np.ndarray) -> None:
        """The next epoch: `values` (n_columns, P) and the mask of members with a row in it, both kept as
        they are (the caller does not change them afterwards)."""
        self.blocks.append(values)
        self.recorded.append(recorded)

    def __len__(self) -> int:
        return len(self.blocks)

    def row(self, p: int, epoch: int = -1) -> dict:
        """Member p's row of an epoch (the newest by default) as a dict, as a history row reads."""
        return dict(zip(self.names, self.values(self.blocks[epoch], p), strict=True))

    def format_row(self, block: np.ndarray, p: int) -> str:
        """Member p's row of `block` as a line of history.csv (what the csv module writes for its dict)."""
        return ",".join(map(repr, self.values(block, p)))

    def values(self, block: np.ndarray, p: int) -> list:
        """Member p's values in `block`, as Python numbers: an integer column's as an int. The last answer
        is kept (a single run's history file and MLflow run both ask for its newest row); not to be
        changed."""
        if self.last_values[0] is block and self.last_values[1] == p:
            return self.last_values[2]
        values = block[:, p].tolist()
        for i in self.integer_positions:
            values[i] = int(values[i])
        self.last_values = (block, p, values)
        return values

    def latest(self, name: str) -> np.ndarray:
        """Every member's `name` in its newest row (NaN for a member without a row yet)."""
        values = np.full(self.n_members, np.nan)
        seen = np.zeros(self.n_members, dtype=bool)
        column = self.index[name]
        for block, recorded in zip(reversed(self.blocks), reversed(self.recorded), strict=True):
            new = recorded & ~seen
            values[new] = block[column, new]
            seen |= new
            if seen.all():
                break
        return values

    def member_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(values (epochs, n_columns, P), recorded (epochs, P)) of the whole table."""
        if not self.blocks:
            return np.empty((0, len(self.names), self.n_members)), np.empty((0, self.n_members), dtype=bool)
        return np.stack(self.blocks), np.stack(self.recorded)

    def freeze(self) -> None:
        """The table as it ended, laid out per member (P, columns, epochs), for `history` and `epochs`."""
        values, self.final_recorded = self.member_rows()
        self.by_member = np.ascontiguousarray(values.transpose(2, 1, 0))

    def epochs(self) -> np.ndarray:
        """Each member's epoch count: one more than its last recorded epoch (0: none; a PBT-revived member's
        history has a gap, so this is not its row count)."""
        recorded = self.final_recorded
        if not len(recorded):
            return np.zeros(self.n_members, dtype=np.int64)
        last = len(recorded) - 1 - np.argmax(recorded[::-1], axis=0)
        epoch = self.by_member[np.arange(self.n_members), self.index["epoch"], last]
        return np.where(recorded.any(axis=0), epoch + 1, 0).astype(np.int64)

    def history(self, p: int) -> pd.DataFrame:
        """Member p's history as a DataFrame (one row per epoch it trained in), as `RunResult.history`."""
        recorded = self.final_recorded[:, p]
        member = self.by_member[p] if recorded.all() else self.by_member[p][:, recorded]
        return pd.DataFrame({name: member[i].astype(np.int64) if name in INTEGER_COLUMNS else member[i]
                             for i, name in enumerate(self.names)})  # fmt: skip


@dataclass(frozen=True)
class BlockLayout:
    """The rows of what an epoch measured, in order (gdlab.module.TrainingModule.epoch_block): loss and
    accuracy on the train split and on each held-out split (`n_metrics` rows); the step record's loss_after,
    trial_step, step, backtracks, failed, evals_fwd, evals_fwdbwd; the `n_numbers` logged optimizer numbers;
    |dW|, |db| of each of `n_layers` layers."""

    n_metrics: int
    n_numbers: int
    n_layers: int

    @property
    def total_column(self) -> int:
        """Where evals/total is among `history_columns`."""
        return 1 + self.n_metrics + 1 + self.n_layers + STEP_COLUMNS.index("evals/total")


def history_columns(measured: list, counts: list, epoch: int, elapsed: float, layout: BlockLayout,
                    sqrt: Callable) -> tuple[list, list]:  # fmt: skip
    """One epoch's history row in the table's column order, and the running counts after it (ls_failures,
    evals_fwd, evals_fwdbwd), from `measured` (`layout`'s rows) and the counts before it. Each value is one
    member's (a float, with `math.sqrt`) or every member's (a (P,) array, with `np.sqrt`): the same
    arithmetic."""
    n, k = layout.n_metrics, layout.n_numbers
    metrics, numbers, norms = measured[:n], measured[n + 7 : n + 7 + k], measured[n + 7 + k :]
    loss_after, trial_step, step, backtracks, failed, fwd, fwdbwd = measured[n : n + 7]
    squares = [norm * norm for norm in norms]  # |dW1|², |db1|², |dW2|², ...
    layers = [sqrt(squares[i] + squares[i + 1]) for i in range(0, len(squares), 2)]
    failures, total_fwd, total_fwdbwd = counts[0] + failed, counts[1] + fwd, counts[2] + fwdbwd
    row = [epoch, *metrics, sqrt(sum(squares)), *layers,
           metrics[0], loss_after, trial_step, step, backtracks, failed, failures, fwd, fwdbwd,
           total_fwd + total_fwdbwd, elapsed, *numbers]  # fmt: skip
    return row, [failures, total_fwd, total_fwdbwd]
