"""`RunInputs`' plain dicts (gdlab.run_inputs) as the entities `MlflowClient.log_inputs` takes, and
those dicts made from a split's arrays (`dataset_dicts`, in whichever process holds MLflow).

Light on purpose (MLflow's entities only, numpy's arrays): the metric writer process imports it, and
gdlab.run_inputs would bring torch in (~2.7 s of the writer's start, while the sweep's epochs wait in the
pipe).
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


SOURCE = "gdlab.data"  # a dataset's CodeDatasetSource: what generates the rows


def dataset_dicts(name: str, splits: list[tuple]) -> list[dict]:
    """The MLflow datasets of splits (context, features, targets) of the rows `name` generates, built with
    `mlflow.data.from_numpy`, as `Dataset.to_dict()` and the input's context."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    source = CodeDatasetSource({"mlflow.source.name": SOURCE, "dataset": name})
    made = []
    for context, features, targets in splits:
        dataset = mlflow.data.from_numpy(features, source=source, targets=targets, name=name)
        made.append({**dataset.to_dict(), "context": context})
    return made
