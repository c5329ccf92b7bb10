"""Live progress of a run or a population, as a Lightning callback.

Where it goes (`Progress.auto`): on a terminal, a tqdm bar on stderr; in a log (stdout not a
terminal: cron, systemd, SLURM), one plain line every `every` seconds; in a notebook, tqdm's widget
bar where ipywidgets is installed, else nothing (tqdm.auto would warn "IProgress not found").
A line reads:
    batch of 64: epoch 120/300, 60 training, 2 retired, 2 pruned; best test/loss 0.0412 (#17)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np
import pytorch_lightning as pl

BAR, LINES, OFF = "bar", "lines", "off"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    return get_ipython is not None and getattr(get_ipython(), "kernel", None) is not None


def has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def auto_mode(every: float) -> str:
    if every <= 0:
        return OFF
    if in_notebook():
        return BAR if has_widgets() else OFF
    return BAR if sys.stderr.isatty() else LINES


class Progress(pl.Callback):
    """Epochs done, members still training / retired (stopped or diverged) / pruned, and the best
    member's current objective, for the members named `names` (trial numbers in a sweep)."""

    def __init__(self, label: str, names: list[str], objective: str, direction: str, mode: str = LINES,
                 every: float = 10.0, out: TextIO | None = None):  # fmt: skip
        self.label, self.names, self.objective = label, names, objective
        self.sign = 1.0 if direction == "minimize" else -1.0
        self.mode, self.every, self.out = mode, every, out
        self.bar = None
        self.last_line = 0.0

    @classmethod
    def auto(cls, label: str, names: list[str], objective: str, direction: str, every: float = 10.0):
        """The progress this process's output suits (see the module's docstring); None: none at all."""
        mode = auto_mode(every)
        return None if mode == OFF else cls(label, names, objective, direction, mode, every)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.total = trainer.max_epochs
        self.last_line = time.monotonic()
        if self.mode == BAR:
            if in_notebook():
                from tqdm.notebook import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.label, unit="epoch", leave=False, dynamic_ncols=True,
                            file=self.out or sys.stderr)  # fmt: skip

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.report(module)  # the previous epoch's rows are in by now (the module's hook runs last)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.report(module, last=True)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report(self, module, last: bool = False) -> None:
        done = len(module.table)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(self.status(module, short=True), refresh=False)
            return
        now = time.monotonic()
        if self.mode == LINES and done and now - self.last_line >= self.every and not last:
            self.last_line = now
            line = f"{self.label}: epoch {done}/{self.total}" + (
                f", {self.status(module)}" if self.status(module) else ""
            )
            print(line, file=self.out or sys.stdout, flush=True)

    def status(self, module, short: bool = False) -> str:
        """Members training / retired (stopped or diverged) / pruned, and the best current objective."""
        n = module.n_members
        pruned = sum(reason is not None for reason in module.pruned)
        alive = int(module.alive.sum())
        retired = n - alive - pruned
        parts = []
        if n > 1:
            parts.append(f"{alive}/{n} live, {pruned} pruned" if short else
                         f"{alive} training, {retired} retired, {pruned} pruned")  # fmt: skip
        best = self.best(module)
        if best is not None:
            value, p = best
            who = f" ({self.names[p]})" if n > 1 else ""
            parts.append(f"best {value:.4g}{who}" if short else f"best {self.objective} {value:.4g}{who}")
        return "; ".join(parts)

    def best(self, module) -> tuple[float, int] | None:
        """(value, member) of the best current objective among the members' latest rows."""
        if self.objective not in module.table.index or not len(module.table):
            return None
        signed = self.sign * module.table.latest(self.objective)
        finite = np.isfinite(signed)
        if not finite.any():
            return None
        p = int(np.flatnonzero(finite)[np.argmin(signed[finite])])
        return self.sign * signed[p], p
