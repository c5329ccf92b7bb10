"""gdlab: gradient descent, backpropagation and backtracking line search on small deep networks."""

from gdlab.version import __version__

__all__ = ["ConfigError", "PBTSettings", "ReplicatedResult", "RunResult", "run", "__version__"]


def __getattr__(name: str):
    # Lazy, so light submodules (the metric writer process, masking) don't import torch and Lightning.
    if name == "run":
        from gdlab.train import run

        return run
    if name == "RunResult":
        from gdlab.record import RunResult

        return RunResult
    if name == "ReplicatedResult":
        from gdlab.replicates import ReplicatedResult

        return ReplicatedResult
    if name == "PBTSettings":
        from gdlab.pbt_rules import PBTSettings

        return PBTSettings
    if name == "ConfigError":
        from gdlab.config import ConfigError

        return ConfigError
    raise AttributeError(f"module 'gdlab' has no attribute {name!r}")
