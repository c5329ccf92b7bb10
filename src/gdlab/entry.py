"""The console scripts: the first thing each does is remember a SIGTERM that arrives while it imports
(gdlab.interrupts.PENDING), and pause the garbage collector (gdlab.import_gc); only then are torch,
Lightning, Hydra and Optuna imported.

Each one ends with `exit_now`: its exit status once everything it does is done, without the interpreter's
teardown of the modules it loaded (1-3 s of freeing torch, Lightning and MLflow, on every command)."""

from __future__ import annotations

from typing import NoReturn

from gdlab import import_gc
from gdlab.interrupts import PENDING
from gdlab.process_exit import exit_now


def train() -> NoReturn:
    PENDING.install()
    import_gc.pause()  # until training starts (gdlab.import_gc)
    from gdlab.train import main_or_interrupted

    exit_now(main_or_interrupted)


def sweep() -> NoReturn:
    PENDING.install()
    import_gc.pause()  # until the trials start (gdlab.import_gc)
    from gdlab.sweep.cli import main

    exit_now(main)


def report() -> NoReturn:
    import_gc.pause()  # until MLflow is imported (gdlab.import_gc)
    from gdlab.report import main

    exit_now(main)
