"""The sweep engine: a named sweep's trials run in-process through Optuna, each an MLflow child run.

spec (the sweep file, parsed and checked), trials (drawing, training and telling trials), pruning, trial_runs,
study (storage, heartbeats, lock), owned_trials (the study's storage), parent_run (the MLflow parent run; also
the callback of Hydra's own sweepers) and cli (the engine's entry, `main(argv)`). Its two fronts: the
gdlab-sweep command and hydra_sweeper (`hydra/sweeper=gdlab` for `gdlab-train -m`).
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
