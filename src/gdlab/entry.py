"""The console scripts: the first thing each does is remember a SIGTERM that arrives while it imports
(gdlab.interrupts.PENDING); only then are torch, Lightning, Hydra and Optuna imported."""

from __future__ import annotations

from gdlab.interrupts import PENDING


def train():
    PENDING.install()
    from gdlab.train import main

    return main()


def sweep():
    PENDING.install()
    from gdlab.sweep.cli import main

    return main()
