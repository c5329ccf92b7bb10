"""`RunInputs`' plain dicts (gdlab.run_inputs) as the entities `MlflowClient.log_inputs` takes.

Light on purpose (MLflow's entities only): the metric writer process imports it, and gdlab.run_inputs
would bring torch in (~2.7 s of the writer's start, while the sweep's epochs wait in the pipe).
"""

from __future__ import annotations

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag (mlflow.utils.mlflow_tags)


def dataset_inputs(datasets: list[dict]) -> list:
    """`RunInputs` dicts as the DatasetInputs `MlflowClient.log_inputs` takes."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag

    return [DatasetInput(DatasetEntity(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                       d.get("profile")), [InputTag(CONTEXT_TAG, d["context"])])
            for d in datasets]  # fmt: skip
