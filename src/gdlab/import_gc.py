"""CPython's cyclic garbage collector, paused while a gdlab command imports.

torch, Lightning, Hydra, Optuna and MLflow leave about a million long-lived objects, and while they are
imported every full collection walks the heap built so far once more: `import gdlab.sweep.cli,
gdlab.sweep.trials, mlflow` took 5.4-6.0 s with collections, 3.2-3.5 s without (measured here). A command
pauses collection first thing (`pause`). Once its imports are done (`resume`: before training, in the
sweep's and the writer's processes, when a multirun starts, once gdlab-report has MLflow), what they made is
frozen out of later collections (`gc.freeze`: it lives as long as the process; so does the little garbage
the imports left, ~14,000 objects, ~8 MB, which a collection first would take 0.8 s to free) and
collection goes on as usual. Only a process that paused it resumes it: gdlab as a library (a notebook, a
script) never touches the collector. A tracked gdlab-sweep imports MLflow in a thread beside Lightning's
import (gdlab.stores) and resumes only once its parent run is made (a worker, --parent-run-id, once it has
imported MLflow's client modules), so MLflow's ~600,000 objects are frozen
too: left in the collected heap, they made each full collection of the sweep take ~0.1 s instead of ~0.01 s
(0.43 s in all against 0.03 s untracked, measured on `gdlab-sweep lr --population 64`).
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Collection off until `resume` (a console script's first step)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """What was imported frozen, collection back on; nothing where `pause` did not turn it off."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
