"""The report's tables: run labels (the params the runs differ in), the objective, the epoch table (train
loss and accuracy at chosen epochs, in the labs' style) and the final table sorted by the objective."""

from __future__ import annotations

import argparse
import math
from collections import Counter

import pandas as pd
from pandas.api.types import is_numeric_dtype

from gdlab.data import SPLIT_METRICS
from gdlab.report.runs import TrackedRun
from gdlab.tracking import short_number

EPOCH_TABLE_METRICS = ("train/loss", "train/acc")
FINAL_TABLE_METRICS = (*SPLIT_METRICS, "evals/total")
OPTIONAL_FINAL_METRICS = SPLIT_METRICS[2:]  # val and test: absent for datasets without such a split
DEFAULT_EPOCH_FRACTIONS = (0.1, 0.5)


# --- labels, objective, epochs -------------------------------------------------------------------------


def differing_params(runs: list[TrackedRun]) -> list[str]:
    return differing_keys([run.params for run in runs])


def differing_keys(param_sets: list[dict]) -> list[str]:
    """Param keys whose values differ between runs, in a readable order (optimizer.name first).

    A key only some runs have (optimizer.beta for backtracking) counts when those runs disagree on it;
    when they agree it adds nothing that optimizer.name does not already say. Tracking settings never
    change what was trained.
    """
    keys = {key for params in param_sets for key in params if not key.startswith("tracking.")}
    differing = [key for key in keys if len({params[key] for params in param_sets if key in params}) > 1]
    return sorted(differing, key=lambda key: (key.split(".")[0], not key.endswith(".name"), key))


MAX_LABEL_KEYS = 4  # more differing params than this (a mixed experiment, the labs): the run's own name


def assign_labels(runs: list[TrackedRun]) -> None:
    """Each run's row label: the params its runs differ in (lr=0.1 depth=2); where more than MAX_LABEL_KEYS
    differ, its name, which gdlab composes from the same things (moons-backtracking-d1-w16-lr1-s42)."""
    keys = differing_params(runs)
    for run in runs:
        parts = [f"{key}={short_number(run.params[key])}" for key in keys if key in run.params]
        run.label = " ".join(parts) if parts and len(keys) <= MAX_LABEL_KEYS else run.name
    counts = Counter(run.label for run in runs)
    for run in runs:
        if counts[run.label] > 1:  # the same config run twice: the run id tells them apart
            run.label = f"{run.label} ({run.run_id[:8]})"


def most_common_param(runs: list[TrackedRun], key: str, default: str) -> str:
    values = Counter(run.params[key] for run in runs if key in run.params)
    return values.most_common(1)[0][0] if values else default


def objective_and_direction(runs: list[TrackedRun], objective: str | None) -> tuple[str, str]:
    """The runs' own objective and direction; a metric named with --objective is maximized if it is an
    accuracy, since the runs' direction belongs to their own objective."""
    runs_objective = most_common_param(runs, "objective", "train/loss")
    if all(f"final/{runs_objective}" in run.latest for run in runs):
        runs_objective = f"final/{runs_objective}"  # gdlab's objective: the value at the trained weights
    if objective is None or objective == runs_objective:
        return runs_objective, most_common_param(runs, "direction", "minimize")
    if objective.startswith("final/") and objective[len("final/") :] == runs_objective.removeprefix("final/"):
        return objective, most_common_param(runs, "direction", "minimize")
    return objective, "maximize" if objective.endswith("acc") else "minimize"


def default_epochs(runs: list[TrackedRun]) -> list[int]:
    """0, 10 %, 50 % and the last epoch of the longest run, without repeats."""
    n_epochs = max(run.epochs for run in runs)
    last = n_epochs - 1
    candidates = [0, *(min(round(fraction * n_epochs), last) for fraction in DEFAULT_EPOCH_FRACTIONS), last]
    return sorted(set(candidates))


def parse_epochs(text: str) -> list[int]:
    try:
        epochs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like 0,10,100, got '{text}'") from None
    if not epochs or min(epochs) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative epochs like 0,10,100, got '{text}'")
    return sorted(set(epochs))


# --- the tables ----------------------------------------------------------------------------------------


def epoch_column(metric: str, epoch: int) -> str:
    return f"{metric}@{epoch}"


def make_epoch_table(runs: list[TrackedRun], epochs: list[int]) -> pd.DataFrame:
    rows = {}
    for run in runs:
        row = {}
        for metric in EPOCH_TABLE_METRICS:
            curve = run.curves[metric] if metric in run.curves else pd.Series(dtype=float)
            for epoch in epochs:
                row[epoch_column(metric, epoch)] = float(curve.get(epoch, math.nan))  # NaN: run too short
        rows[run.label] = row
    return labelled_frame(rows)


def make_final_table(runs: list[TrackedRun], objective: str, direction: str) -> pd.DataFrame:
    metrics = list(FINAL_TABLE_METRICS)
    if objective not in metrics:
        metrics.append(objective)
    rows = {run.label: {**{m: run.last(m) for m in metrics}, "epochs": run.epochs} for run in runs}
    table = labelled_frame(rows)
    absent = [m for m in OPTIONAL_FINAL_METRICS if m != objective and table[m].isna().all()]
    table = table.drop(columns=absent)
    if any(run.status != "FINISHED" for run in runs):
        table["status"] = [run.outcome for run in runs]
    # NaN/inf values are not logged, so a diverged run's last logged loss looks good: like gdlab, give
    # it no objective, which sorts it last.
    ranked = table[objective].mask([run.diverged_at is not None for run in runs])
    order = ranked.sort_values(ascending=direction == "minimize", kind="stable", na_position="last").index
    return table.loc[order]


def labelled_frame(rows: dict[str, dict]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


def format_value(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""  # a run shorter than the epoch, or a metric it does not have
        return str(int(value)) if value.is_integer() else f"{value:.6g}"  # evaluation counts in full
    return str(value)


def escape_markdown(cell: str) -> str:
    return cell.replace("|", "\\|")


def text_table(table: pd.DataFrame) -> str:
    return table.to_string(formatters={column: format_value for column in table.columns}, na_rep="")


def markdown_table(table: pd.DataFrame) -> str:
    """`table` as a GitHub Markdown table (tabulate, which pandas' to_markdown needs, is not a dependency)."""
    header = [table.index.name or "", *map(str, table.columns)]
    rows = [[str(label), *map(format_value, values)] for label, *values in table.itertuples()]
    lines = [
        "| " + " | ".join(map(escape_markdown, header)) + " |",
        "| --- | "
        + " | ".join("---:" if is_numeric_dtype(table[c]) else "---" for c in table.columns)
        + " |",
        *("| " + " | ".join(map(escape_markdown, row)) + " |" for row in rows),
    ]
    return "\n".join(lines)
