"""A population's epochs to its MLflow runs in bulk: the epoch sink behind every tracked population.

Each epoch's rows are already columns ((n_columns, P) arrays, gdlab.epoch_table.EpochTable). `RunEpochs`
keeps them as they are and, four times every `tracking.flush_seconds`, hands the metric writer process one
message holding every tracked member's new epochs (gdlab.metric_writer's "columns" message), so the
training process does no per-member Python on the epoch path, whatever P is. Which values become MLflow
rows is decided here, for all members at once, by the rules a single run's `MlflowRun.log_epoch_rows`
applies row by row: no row for an unlogged column or a NaN; a LOGGED_ON_CHANGE column only where it
differs from the member's last logged value. A single run (not run by the writer from its start) keeps
`log_epoch`, so a short run never waits for the writer process to start."""

from __future__ import annotations

import time

import numpy as np

from gdlab.metric_writer import encode
from gdlab.tracking import LOGGED_ON_CHANGE, UNLOGGED, MlflowRun

# A population's epochs go to the writer 4x as often as a single run's (every 0.25 s by default): the writer
# keeps pace on its own core, and what is left to write when training ends, the last interval's rows of
# every member (~0.45 s at P = 64 every 1 s), is waited for by the batch (a sweep's next ask, its report).
POPULATION_FLUSH_SHARE = 0.25


class RunEpochs:
    """An epoch sink (gdlab.module.EpochSink): each tracked member's rows to its MLflow run (None: not
    tracked)."""

    def __init__(self, runs: list[MlflowRun | None]):
        self.tracked = np.array([p for p, run in enumerate(runs) if run is not None], dtype=np.int64)
        self.runs = [runs[p] for p in self.tracked]
        self.single = len(self.runs) == 1 and not self.runs[0].background
        self.single_member = int(self.tracked[0]) if self.single else None
        self.flush_seconds = POPULATION_FLUSH_SHARE * min(
            (run.flush_seconds for run in self.runs), default=1.0
        )
        self.last_flush: float | None = None  # the clock starts at the first epoch, as a single run's
        self.pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (timestamp, steps, values) per epoch
        self.last_logged: dict[int, np.ndarray] = {}  # LOGGED_ON_CHANGE column -> each member's last value

    def __call__(self, table, members) -> None:
        if not self.runs:
            return
        if self.single:
            self.runs[0].log_epoch(table.row(self.single_member))
            return
        self.pending.append((int(time.time() * 1000), *self.logged(table)))
        now = time.monotonic()
        if self.last_flush is None:
            self.last_flush = now
        elif now - self.last_flush >= self.flush_seconds:
            self.flush()

    def logged(self, table) -> tuple[np.ndarray, np.ndarray]:
        """(each tracked member's step, the newest epoch's values with NaN where no row is logged)."""
        block, recorded = table.blocks[-1][:, self.tracked], table.recorded[-1][self.tracked]
        steps = block[table.index["epoch"]].astype(np.int64)
        keep = [i for i, name in enumerate(table.names) if name not in UNLOGGED]
        values = block[keep]
        values[:, ~recorded] = np.nan
        for row, i in enumerate(keep):
            if table.names[i] in LOGGED_ON_CHANGE:
                last = self.last_logged.setdefault(i, np.full(len(self.tracked), np.nan))
                changed = ~np.isnan(values[row]) & (values[row] != last)
                last[changed] = values[row][changed]
                values[row][~changed] = np.nan
        self.names = [table.names[i] for i in keep]
        return steps, values

    def flush(self) -> None:
        """Hand every pending epoch to the writer in one message."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        timestamps, steps, values = zip(*self.pending, strict=True)
        self.pending = []
        writer = self.runs[0].writer
        writer.send({"columns": {
            "runs": [run.run_id for run in self.runs], "keys": self.names, "timestamps": list(timestamps),
            "steps": encode(np.stack(steps)), "values": encode(np.stack(values)),
        }})  # fmt: skip
        for run in self.runs:
            run.submitted = True  # its `close` and `wait` go through the writer, after these rows

    def close(self) -> None:
        """The last epochs, before any run's closing messages."""
        if not self.single:
            self.flush()
