"""The console scripts: the first thing each does is remember a SIGTERM that arrives while it imports
(gdlab.interrupts.PENDING); only then are torch, Lightning, Hydra and Optuna imported.

Each one ends with `exit_now`: its exit status once everything it does is done, without the interpreter's
teardown of the modules it loaded (1-3 s of freeing torch, Lightning and MLflow, on every command)."""

from __future__ import annotations

import functools
import sys
from typing import NoReturn

from gdlab.interrupts import PENDING, exit_code_of, interruption_reason
from gdlab.process_exit import exit_now


def train() -> NoReturn:
    PENDING.install()
    from gdlab.train import main

    exit_now(functools.partial(interruptible, main))


def interruptible(main) -> int | None:
    """`main`, where a Ctrl-C or SIGTERM that escapes it (one between a multirun's jobs: each job handles its
    own) is one line on stderr and exit 128 + the signal, not a traceback. The multirun's callback has ended
    its parent run KILLED and said so (`gdlab.train.stopped_by`)."""
    try:
        return main()
    except KeyboardInterrupt as stop:
        from gdlab import train

        if train.stopped_by is None:
            print(f"gdlab-train: {interruption_reason(stop)}", file=sys.stderr)
        return exit_code_of(stop)


def sweep() -> NoReturn:
    PENDING.install()
    from gdlab.sweep.cli import main

    exit_now(main)


def report() -> NoReturn:
    from gdlab.report import main

    exit_now(main)
