"""The metric rows this process handed MLflow, run by run: a sweep's report draws its trials' curves from them
instead of reading every history back from the store (gdlab.report.runs.read_histories).

Kept only between `keep()` and `drop()` (gdlab-sweep keeps them for the trials it trains itself; nothing else
does). Every metric message of a run's record is seen as it is handed over (gdlab.metric_writer.OBSERVERS):
the "metrics" rows of a run, the "columns" blocks of a population, and the rows a single run logs itself.
Curves are what MLflow's SQL store makes of those rows: ±inf stored as ±max float
(gdlab.metric_store.stored_value), and of a step logged twice the latest row (by timestamp), as the report
orders the rows it reads back. A run whose record may not all have reached the store (an outage, a writer
that died: `forget`), a run trained by another process, and all runs once more than MAX_HELD_BYTES came,
are read back from the store. tests/test_held_histories.py proves held curves equal to those MLflow's
client reads back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from gdlab.metric_store import MAX_FLOAT
from gdlab.metric_writer import OBSERVERS, decode

# What is held at most (~bytes of the messages and rows kept): past it, nothing is held any more and the
# report reads every curve back from the store, as before. A sweep of 64 trials x 300 epochs holds ~4 MB.
MAX_HELD_BYTES = 256 * 2**20
ROW_BYTES = 150  # one (key, value, timestamp, step) row kept as a Python list


class HeldHistories:
    """The rows of each run as handed over: single rows of the curves' keys, and populations' (epochs, keys,
    runs) blocks, as long as they stay under MAX_HELD_BYTES."""

    def __init__(self, is_curve: Callable[[str], bool] = lambda key: True):
        self.is_curve = is_curve  # which single rows are kept (a block is kept whole, as it came)
        self.rows: dict[str, list] = defaultdict(list)  # run id -> [[key, value, timestamp, step], ...]
        self.blocks: list[dict] = []  # "columns" messages: runs, keys, timestamps, steps, values
        self.forgotten: set[str] = set()
        self.size, self.overflowed = 0, False

    def note(self, message: dict) -> None:
        """One message of a run's record (gdlab.metric_writer's protocol); only metric rows are kept."""
        if self.overflowed:
            return
        if "columns" in message:  # decoded when read: nothing more on the epoch path than keeping it
            block = message["columns"]
            self.blocks.append(block)
            self.size += len(block["values"]["data"]) + len(block["steps"]["data"])
        elif message.get("metrics"):
            rows = [row for row in message["metrics"] if self.is_curve(row[0])]
            self.rows[message["run"]].extend(rows)
            self.size += ROW_BYTES * len(rows)
        if self.size > MAX_HELD_BYTES:
            self.overflowed = True
            self.rows, self.blocks = defaultdict(list), []

    def held(self, run_ids: list[str]) -> set[str]:
        """Those of `run_ids` whose whole record passed through here."""
        if self.overflowed:
            return set()
        here = set(self.rows).union(*(block["runs"] for block in self.blocks))
        return {run_id for run_id in run_ids if run_id in here and run_id not in self.forgotten}

    def curves(self, run_ids: list[str], keys: list[str]) -> dict:
        """{(run id, key): its values by step, a pandas Series} of the held runs among `run_ids`, `keys`."""
        wanted, keys = self.held(run_ids), set(keys)
        pieces: dict[tuple[str, str], list] = defaultdict(list)  # (steps, timestamps, values) arrays
        for (runs, block_keys), blocks in self.block_groups(wanted).items():
            steps = np.concatenate([decode(block["steps"]) for block in blocks])  # (epochs, runs)
            values = np.concatenate([decode(block["values"]) for block in blocks])  # (epochs, keys, runs)
            timestamps = np.concatenate([np.asarray(block["timestamps"], np.int64) for block in blocks])
            for j, run_id in enumerate(runs):
                for k, key in enumerate(block_keys):
                    if run_id in wanted and key in keys:
                        column = values[:, k, j]
                        logged = ~np.isnan(column)
                        pieces[(run_id, key)].append((steps[logged, j], timestamps[logged], column[logged]))
        for run_id in wanted:
            by_key = defaultdict(list)
            for key, value, timestamp, step in self.rows.get(run_id, ()):
                if key in keys:
                    by_key[key].append((step, timestamp, value))
            for key, rows in by_key.items():
                step, timestamp, value = (np.array(column) for column in zip(*rows, strict=True))
                pieces[(run_id, key)].append((step, timestamp, value.astype(np.float64)))
        return {pair: curve_of(parts) for pair, parts in pieces.items()}

    def block_groups(self, wanted: set[str]) -> dict[tuple, list[dict]]:
        """The blocks holding any of `wanted` by their (runs, keys): a population's flushes, read together."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for block in self.blocks:
            if not wanted.isdisjoint(block["runs"]):
                groups[(tuple(block["runs"]), tuple(block["keys"]))].append(block)
        return groups


def curve_of(parts: list[tuple]):
    """One metric's rows as its curve: by step, the latest row of a step kept, as the store keeps values."""
    import pandas as pd

    steps, timestamps, values = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((timestamps, steps))  # by step, then timestamp: the last of each step wins
    steps, values = steps[order].astype(np.int64), values[order]
    last = np.append(steps[1:] != steps[:-1], True)
    values = np.where(np.isinf(values), np.sign(values) * MAX_FLOAT, values)
    return pd.Series(values[last], index=steps[last], dtype=float)


_HELD: HeldHistories | None = None


def keep(is_curve: Callable[[str], bool] = lambda key: True) -> None:
    """From now on, every run's metric rows handed over in this process are held (a new, empty record);
    of single rows, those whose key `is_curve`."""
    global _HELD
    drop()
    _HELD = HeldHistories(is_curve)
    OBSERVERS.append(_HELD.note)


def drop() -> None:
    """Hold nothing more, and free what was held."""
    global _HELD
    if _HELD is not None:
        OBSERVERS.remove(_HELD.note)
    _HELD = None


def forget(run_id: str) -> None:
    """`run_id`'s record may not all be in the store: its curves are read back from there."""
    if _HELD is not None:
        _HELD.forgotten.add(run_id)


def held_curves(run_ids: list[str], keys: list[str]) -> dict:
    """`HeldHistories.curves` of what is held now ({} when nothing is)."""
    return {} if _HELD is None else _HELD.curves(run_ids, keys)


def held_runs(run_ids: list[str]) -> set[str]:
    return set() if _HELD is None else _HELD.held(run_ids)
