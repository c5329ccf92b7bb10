"""The README's step-size rules table from a `gdlab-sweep step_rules` study: per rule, the final train and
validation loss (median, and min–max over seeds) and the evaluations per step, at the sweep's evaluation
budget. The rules are compared on validation; the test split is measured once, by the sweep's refit of the
best rule (its `result:` line and the parent run's result/test/loss).

Usage (in the folder the sweep ran in): python docs/step_rules_table.py [STUDY] [--objective-only]
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import optuna
from mlflow import MlflowClient


def spread(values: list[float]) -> str:
    """Median (min–max) of the finite values; a diverged run (no final value) is counted, not averaged."""
    finite = [v for v in values if math.isfinite(v)]
    diverged = f", {len(values) - len(finite)} diverged" if len(finite) < len(values) else ""
    if not finite:
        return f"–{diverged}"
    return f"{statistics.median(finite):.3g} ({min(finite):.3g}–{max(finite):.3g}{diverged})"


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
        row["train"].append(metrics.get("final/train/loss", math.nan))  # NaN/inf are not logged
        if "final/val/loss" in metrics or "final/rows/val" in metrics:
            row["val"].append(metrics.get("final/val/loss", math.nan))
        row["per_step"].append(metrics["final/evals"] / metrics["final/epochs"])
        row["evals"].append(metrics["final/evals"])
    print(f"study {study_name}: {len(study.trials)} trials\n")
    print(
        "| rule | final train loss, median (min–max) | final validation loss | evaluations per step "
        "| evaluations |"
    )
    print("| --- | --- | --- | --- | --- |")
    finite_median = lambda values: statistics.median([v for v in values if math.isfinite(v)] or [math.inf])  # noqa: E731
    for rule, row in sorted(rows.items(), key=lambda item: finite_median(item[1]["val"] or item[1]["train"])):
        per_step, evals = statistics.median(row["per_step"]), statistics.median(row["evals"])
        print(f"| {rule} | {spread(row['train'])} | {spread(row['val'])} | {per_step:.2f} | {evals:.0f} |")


if __name__ == "__main__":
    main()
