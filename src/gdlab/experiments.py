"""The MLflow experiments gdlab writes to: found, created or restored by name, in MLflow's training view."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=64)
def experiment_of_run(client, run_id: str) -> str:
    """The experiment of a (parent) run: asked once per process, not once per trial."""
    return client.get_run(run_id).info.experiment_id


# MLflow 3's UI opens an experiment in its "Model training" view, not the GenAI one, by this tag (the UI's
# ExperimentKind: custom_model_development; an "_inferred" value is the UI's own guess, replaced).
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment `name`, created (or restored) in MLflow's training view."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})  # fmt: skip
        except Exception:  # created meanwhile by a concurrent run
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred"):  # made by an older gdlab, or guessed by the UI
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id
