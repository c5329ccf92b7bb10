"""A trained network as an MLflow model (the UI's Models column, the Model registry).

`mlflow.pytorch.log_model` of the MLP behind its head: features in as the run trained on them (its
`train` dataset: standardized where `dataset.standardize`), the head's probabilities out, as
`MLP.predict_proba` gives them. It is traced to TorchScript, so loading it needs torch, not gdlab
(torch.export, MLflow's `pt2` format, took ~5 s a model here, tracing 0.05 s); its signature and input
example come from the training split. Logged on the run before the run ends: a FINISHED run holds it.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch
from torch import nn

from gdlab.model import MLP, head_output

MODEL_NAME = "model"
# MLflow's requirement check, as mlflow.utils.environment and mlflow.pyfunc each name it
SCAN_HOOK = "warn_dependency_requirement_mismatches"
INPUT_EXAMPLE_ROWS = 5


class Probabilities(nn.Module):
    """An MLP with its head: what `mlflow.pyfunc.load_model(uri).predict(X)` returns."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp = mlp.member(0) if mlp.layers[0][0].dim() == 3 else mlp  # one member, 2-D weights
        self.head = mlp.head

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return head_output(self.mlp(X), self.head)


@contextlib.contextmanager
def tracking_uri_set(uri: str):
    """MLflow's model logging reads the process's tracking URI, and setting it also sets
    MLFLOW_TRACKING_URI for every later child process: both put back afterwards."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def model_requirements() -> list[str]:
    """The model's pip requirements: the installed torch, as the traced model needs it (MLflow adds its own
    installed version)."""
    return [f"torch=={torch.__version__.split('+')[0]}"]


@contextlib.contextmanager
def no_requirement_scan():
    """MLflow checks a logged model's requirements against the installed distributions and warns of a
    mismatch, twice: when it writes the requirements and when it loads the model back to validate the
    input example. The first check in a process costs ~1 s (it maps every installed distribution to its
    modules). gdlab's requirements are the installed versions (model_requirements, and MLflow's own pin),
    so the check cannot warn; it is skipped while logging, in both places. Guarded: a module that no
    longer has the hook is left alone. tests/test_mlflow_conventions.py proves the logged requirements
    satisfied through MLflow's own check."""
    import mlflow.pyfunc
    from mlflow.utils import environment

    hooks = [module for module in (environment, mlflow.pyfunc)
             if callable(getattr(module, SCAN_HOOK, None))]  # fmt: skip
    saved = [getattr(module, SCAN_HOOK) for module in hooks]
    for module in hooks:
        setattr(module, SCAN_HOOK, lambda requirements: None)
    try:
        yield
    finally:
        for module, hook in zip(hooks, saved, strict=True):
            setattr(module, SCAN_HOOK, hook)


@contextlib.contextmanager
def run_experiment(experiment_id: str):
    """... and files the model under the process's experiment (Default, 0, in gdlab), not its run's: the
    run's meanwhile, so the UI's Models column and the run's page show it, its files under that
    experiment's artifact root."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before


def new_logged_model(client, run) -> str | None:
    """The id of a new LoggedModel for `run`, as `mlflow.pytorch.log_model` would create it (the run's
    params, the process's context tags), except for MLflow's GitRunContext: its tags name the repository
    of the process's main file (a console script in a venv: none), and finding that out imports GitPython,
    ~0.8 s of a sweep's end. The run records gdlab's own commit (git.commit). Guarded: where MLflow's
    context registry is not where it was, None, and log_model creates the model itself; where its "last
    logged model" is not, `mlflow.last_logged_model()` does not name it.
    tests/test_mlflow_conventions.py proves the tags and params equal to MLflow's own path's."""
    try:
        from mlflow.tracking.context.git_context import GitRunContext
        from mlflow.tracking.context.registry import resolve_tags
    except ImportError:
        return None
    tags = resolve_tags(ignore=[GitRunContext])
    params = {key: str(value) for key, value in run.data.params.items()}
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run.info.run_id,
                                       tags=tags, params=params)  # fmt: skip
    with contextlib.suppress(ImportError):  # mlflow.last_logged_model() names it, as MLflow's own path does
        from mlflow.tracking.fluent import _last_logged_model_id

        _last_logged_model_id.set(model.model_id)
    return model.model_id


def log_model(uri: str, run_id: str, mlp: MLP, X_train: np.ndarray, step: int,
              registered_name: str | None = None) -> tuple[str, str | None]:  # fmt: skip
    """Log `mlp` on run `run_id` (and register it as a new version of `registered_name`): its model URI and
    registered version. MLflow's own "Successfully registered ..." lines are gdlab's to say.

    `step`: the run's step of the trained weights (its `epochs`, where gdlab logs final/<metric> and each
    curve's last point). MLflow links the run's metrics of that step to the model (the UI's model page and
    Models column show them): they must be in the store already, and the model's step must be theirs, not
    MLflow's default 0 (the untrained network's numbers)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = Probabilities(mlp).eval()
    example = np.ascontiguousarray(X_train[:INPUT_EXAMPLE_ROWS])
    with torch.no_grad():
        signature = infer_signature(X_train, model(torch.as_tensor(X_train)).numpy())
        traced = torch.jit.trace(model, torch.as_tensor(example))
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    with (tracking_uri_set(uri), run_experiment(experiment_id), no_requirement_scan(),
          contextlib.redirect_stderr(io.StringIO())):  # fmt: skip
        info = mlflow.pytorch.log_model(
            traced, name=MODEL_NAME, run_id=run_id, step=step, signature=signature, input_example=example,
            serialization_format="pickle", pip_requirements=model_requirements(),
            registered_model_name=registered_name, model_id=new_logged_model(client, run),
        )  # fmt: skip
    version = info.registered_model_version
    return info.model_uri, None if version is None else str(version)


def warm_up() -> None:
    """What the first `log_model` of a process imports and builds (MLflow's pytorch flavour, its pyfunc
    loader, input example validation, the context tags' IPython check: ~0.4 s), done now on a throwaway
    network saved to a temporary folder; no store is touched. gdlab.model_logger's child does it while the
    trials train, so the refit's model is logged in ~0.1 s."""
    import tempfile

    import mlflow.pytorch
    from mlflow.models import infer_signature

    with contextlib.suppress(ImportError):
        from mlflow.tracking.context.git_context import GitRunContext
        from mlflow.tracking.context.registry import resolve_tags

        resolve_tags(ignore=[GitRunContext])
    model = Probabilities(MLP([2, 2, 1], activation="tanh", head="sigmoid", loss="bce").double()).eval()
    X = np.zeros((INPUT_EXAMPLE_ROWS, 2))
    with torch.no_grad():
        signature = infer_signature(X, model(torch.as_tensor(X)).numpy())
        traced = torch.jit.trace(model, torch.as_tensor(X))
    with (tempfile.TemporaryDirectory() as folder, no_requirement_scan(),
          contextlib.redirect_stderr(io.StringIO())):  # fmt: skip
        mlflow.pytorch.save_model(traced, f"{folder}/model", signature=signature, input_example=X,
                                  serialization_format="pickle",
                                  pip_requirements=model_requirements())  # fmt: skip
