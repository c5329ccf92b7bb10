"""A link that opens a sweep's answer in the MLflow UI: the sweep's trials ranked by the objective, with
the objective and the searched parameters as columns (and the runs' Dataset and Models).

MLflow's UI opens a "shared view" from its URL: `#/experiments/<id>/runs?viewStateShareKey=<key>` loads
the view state stored in the experiment's tag `mlflow.sharedViewState.<key>` (the UI's own "share"
button writes the same tag): the search facets (filter, order) and the runs table's columns.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote, urlsplit

SHARED_VIEW_TAG = "mlflow.sharedViewState."
LINK_TAG = "gdlab.ui_link"  # on the parent run


def column(kind: str, key: str) -> str:
    """The runs table's name of a column: metrics.`final/val/loss`, params.`optimizer.lr`."""
    return f"{kind}.`{key}`"


def trials_filter(parent_run_id: str) -> str:
    """The sweep's trials: its parent's children that are Optuna trials (not the refit)."""
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`optuna.trial` LIKE '%'"


def view_state(parent_run_id: str, objective: str, direction: str, params: list[str]) -> dict:
    metric = column("metrics", f"final/{objective}")
    return {
        "searchFilter": trials_filter(parent_run_id),
        "orderByKey": metric,
        "orderByAsc": direction == "minimize",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [
            metric,
            *(column("params", p) for p in params),
            column("attributes", "Dataset"),
            column("attributes", "Models"),
        ],  # fmt: skip
    }


def share_sweep_view(client, experiment_id: str, parent_run_id: str, objective: str, direction: str,
                     params: list[str]) -> str:  # fmt: skip
    """Store the sweep's view on its experiment; its share key (one per parent run and view)."""
    state = json.dumps(view_state(parent_run_id, objective, direction, params), sort_keys=True)
    key = hashlib.sha256(state.encode()).hexdigest()[:16]
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, state)
    return key


def ui_base(tracking_uri: str) -> str | None:
    """The MLflow UI's address for a tracking URI: the server itself, without credentials; None for a
    database store (the UI is then `mlflow ui` on it, at http://127.0.0.1:5000)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"


def sweep_link(tracking_uri: str, experiment_id: str, key: str) -> tuple[str, str | None]:
    """(the URL, the command that starts the UI first, or None for a tracking server)."""
    from gdlab.masking import mask_passwords

    base, command = ui_base(tracking_uri), None
    if base is None:
        base = "http://127.0.0.1:5000"
        command = f"mlflow ui --backend-store-uri '{mask_passwords(tracking_uri)}'"
    # workflowType: MLflow 3.17's UI takes the experiment's view from the browser's last choice (GenAI at
    # first), not from the experiment's tag; the URL's choice is applied without being stored.
    view = f"runs?viewStateShareKey={key}&workflowType=machine_learning"
    return f"{base}/#/experiments/{quote(experiment_id)}/{view}", command


def sweep_view_lines(task, parent_run_id: str, params: list[str]) -> list[str]:
    """Share the sweep's view, tag its URL on the parent run, and say where it is (lines to print)."""
    from gdlab.tracking import tracking_uri
    from gdlab.writer_client import WriterClient

    uri = tracking_uri(task)
    try:
        client = WriterClient(uri)  # the metric writer's calls where it is at work: no MLflow here
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        key = share_sweep_view(client, experiment_id, parent_run_id, task.objective, task.direction, params)
        url, command = sweep_link(uri, experiment_id, key)
        client.set_tag(parent_run_id, LINK_TAG, url)
    except Exception as error:  # a convenience: the sweep's record stands without it
        from gdlab.masking import error_line

        return [f"no MLflow UI link: {error_line(error)}"]
    from gdlab.sweep.parent_run import parent_line

    lines = [f"the trials ranked by {task.objective} in the MLflow UI: {url}"]
    lines += [] if command is None else [f"(start the UI first: {command})"]
    return [parent_line(task, parent_run_id), *lines]
