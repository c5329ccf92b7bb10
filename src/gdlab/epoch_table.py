"""A population's history as one table: per epoch, every member's row as a column of an (n_columns, P)
array, and which members have a row in it. `TrainingModule` appends to it; records, history files and the
metric pipe read it in bulk."""

from __future__ import annotations

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
        self.blocks: list[np.ndarray] = []
        self.recorded: list[np.ndarray] = []

    def append(self, values: np.ndarray, recorded: np.ndarray) -> None:
        self.blocks.append(values)
        self.recorded.append(recorded.copy())

    def __len__(self) -> int:
        return len(self.blocks)

    def row(self, p: int, epoch: int = -1) -> dict:
        """Member p's row of an epoch (the newest by default) as a dict, as a history row reads."""
        values = self.blocks[epoch][:, p].tolist()
        return {
            name: int(v) if name in INTEGER_COLUMNS else v for name, v in zip(self.names, values, strict=True)
        }

    def format_row(self, block: np.ndarray, p: int) -> str:
        """Member p's row of `block` as a line of history.csv (what the csv module writes for its dict)."""
        values = block[:, p].tolist()
        return ",".join(str(int(v)) if name in INTEGER_COLUMNS else repr(v)
                        for name, v in zip(self.names, values, strict=True))  # fmt: skip

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
