"""gdlab: gradient descent, backpropagation and backtracking line search on small deep networks."""

__version__ = "0.1.0"

from gdlab.config import ConfigError  # noqa: E402
from gdlab.train import RunResult, run  # noqa: E402

__all__ = ["ConfigError", "RunResult", "run", "__version__"]
