"""gdlab-sweep: a named sweep's trials run in-process through Optuna, each tracked as an MLflow child run.

spec (the sweep file, parsed and checked), trials (drawing, training and telling trials), study (storage,
heartbeats, lock), parent_run (the MLflow parent run; also Hydra multirun's callback) and cli (gdlab-sweep).
Lazy, so that Hydra's callback (gdlab.sweep.parent_run) does not import Optuna and the trial machinery.
"""

__all__ = ["SweepError", "load_sweep", "lr_per_optimizer", "main"]


def __getattr__(name: str):
    if name == "main":
        from gdlab.sweep.cli import main

        return main
    if name in ("SweepError", "load_sweep", "lr_per_optimizer"):
        from gdlab.sweep import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'gdlab.sweep' has no attribute {name!r}")
