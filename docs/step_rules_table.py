"""The README's step-size rules table from a `gdlab-sweep step_rules` study: per rule, the final train and
validation loss (median, and min–max over seeds) and the evaluations per step, at the sweep's evaluation
budget. The rules are compared on validation; the test split is measured once, by the sweep's refit of the
best rule (its `result:` line and the parent run's result/test/loss).

Usage (in the folder the sweep ran in): python docs/step_rules_table.py [STUDY] [--objective-only]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import optuna
from mlflow import MlflowClient


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def main() -> None:
    study_name = sys.argv[1] if len(sys.argv) > 1 else "step_rules"
    storage = f"sqlite:///{Path('mlruns/optuna.db').resolve()}"
    client = MlflowClient(tracking_uri=f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    rows: dict[str, dict[str, list[float]]] = {}
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None:
            continue
        metrics = client.get_run(run_id).data.metrics
        row = rows.setdefault(
            trial.params["optimizer"], {"train": [], "val": [], "per_step": [], "evals": []}
        )
        row["train"].append(metrics["final/train/loss"])
        if "final/val/loss" in metrics:
            row["val"].append(metrics["final/val/loss"])
        row["per_step"].append(metrics["final/evals"] / metrics["final/epochs"])
        row["evals"].append(metrics["final/evals"])
    print(f"study {study_name}: {len(study.trials)} trials\n")
    print(
        "| rule | final train loss, median (min–max) | final validation loss | evaluations per step "
        "| evaluations |"
    )
    print("| --- | --- | --- | --- | --- |")
    for rule, row in sorted(rows.items(), key=lambda item: statistics.median(item[1]["train"])):
        per_step, evals = statistics.median(row["per_step"]), statistics.median(row["evals"])
        print(f"| {rule} | {spread(row['train'])} | {spread(row['val'])} | {per_step:.2f} | {evals:.0f} |")


if __name__ == "__main__":
    main()
