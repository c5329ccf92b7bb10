"""`gdlab-report`: compare the runs of an experiment, or the child runs of a sweep, from MLflow alone.

    gdlab-report TARGET [--tracking-uri URI] [--out DIR] [--epochs 0,10,100] [--objective METRIC] [--no-log]

TARGET is an experiment name or a parent run id. The report is two tables (train loss and accuracy at
chosen epochs, in the labs' style, and the final metrics sorted by the objective), printed and written
to DIR/report.md (and as CSV) with the curves as PNGs. A parent run also gets the folder as artifacts
under report/. In a notebook: ``build_report("moons", tracking_uri=...)`` returns the tables as DataFrames.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pandas.api.types import is_numeric_dtype

from gdlab.data import SPLIT_METRICS
from gdlab.masking import error_line, mask_passwords
from gdlab.report_figures import write_figures
from gdlab.report_pbt import (
    best_member,
    load_pbt_records,
    markdown_section,
    plot_lineage,
    write_best_schedule,
)
from gdlab.tracking import REFIT_ROLE, RESULT_TAG, ROLE_TAG, SELECTED_ON_TAG, short_number

CURVE_METRICS = (*SPLIT_METRICS, "evals/total")
EPOCH_TABLE_METRICS = ("train/loss", "train/acc")
FINAL_TABLE_METRICS = (*SPLIT_METRICS, "evals/total")
OPTIONAL_FINAL_METRICS = SPLIT_METRICS[2:]  # val and test: absent for datasets without such a split
DEFAULT_EPOCH_FRACTIONS = (0.1, 0.5)


class ReportError(Exception):
    """A report that cannot be made (unknown target, no runs, unreachable store): one line for the user."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@dataclass
class TrackedRun:
    """What the report needs of one MLflow run: its params, and its curves indexed by epoch."""

    run_id: str
    name: str
    params: dict[str, str]
    curves: pd.DataFrame  # index: epoch (the MLflow step); columns: the metrics in CURVE_METRICS it has
    status: str = "FINISHED"  # MLflow's: FINISHED, FAILED, KILLED, RUNNING
    diverged_at: str | None = None  # gdlab's failure.epoch tag: the loss became NaN/inf there
    label: str = ""
    latest: dict = field(default_factory=dict)  # every metric's latest value (final/<metric> included)
    tags: dict = field(default_factory=dict)  # its MLflow tags (optuna.state=PRUNED marks a pruned trial)
    pbt: dict | None = None  # a PBT member's pbt.json (gdlab.pbt.PopulationBasedTraining.member_record)

    @property
    def outcome(self) -> str:
        return f"diverged at epoch {self.diverged_at}" if self.diverged_at is not None else self.status

    @property
    def epochs(self) -> int:
        """Epochs trained: final/epochs where logged (a curve's last point, step = epochs, is the trained
        weights' value), else the last step + 1 (runs of gdlab before that point was logged)."""
        if "final/epochs" in self.latest:
            return int(self.latest["final/epochs"])
        return int(self.curves.index.max()) + 1 if len(self.curves) else 0

    def last(self, metric: str) -> float:
        if metric not in self.curves:
            return float(self.latest.get(metric, math.nan))
        values = self.curves[metric].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan


@dataclass
class Report:
    epoch_table: pd.DataFrame  # one row per run (index: label), train/loss and train/acc at chosen epochs
    final_table: pd.DataFrame  # one row per run (index: label), last values, sorted by the objective
    paths: list[Path] = field(default_factory=list)  # files written to the output folder
    objective: str = ""
    direction: str = ""
    runs: list[TrackedRun] = field(default_factory=list)  # in the final table's order
    parent_run_id: str | None = None  # set when the target was a parent run
    logged_to_parent: bool = False
    figures: list = field(default_factory=list)  # gdlab.report_figures.Drawn: what each figure shows
    selected_on: str | None = None  # a sweep's: the split its trials were ranked on (train, val, test)
    result: str | None = None  # a sweep's: its test result and how it was measured (gdlab.sweep.refit)
    refit: TrackedRun | None = None  # the refit of the chosen trial, kept out of the ranking

    def caveats(self) -> list[str]:
        """What a reader must know about how the runs were ranked and what the result means."""
        lines = []
        if self.selected_on == "test":
            lines.append("**Selected on the test split** (gdlab_sweep.select_on_test): the best test score "
                         "is the best of many looks at the same rows, an optimistic estimate.")  # fmt: skip
        if self.result:
            lines.append(f"**{self.result}**")
        return lines


# --- where the runs are --------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else gdlab's local store: ./mlruns/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


def default_out_dir(target: str) -> Path:
    return Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "_", target)


def make_client(uri: str):
    from gdlab.stores import mlflow_client  # also ends runs that dead processes left RUNNING

    # Opening a SQLite URI creates the database: a mistyped path must not leave an empty store behind.
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ReportError(f"no MLflow store at {uri} (the file {database} does not exist)")
    try:
        return mlflow_client(uri)
    except Exception as error:  # not an MLflow store, a corrupt file, an unreachable server
        what = f"cannot open the MLflow store at {mask_passwords(uri)}"
        raise ReportError(f"{what}: {error_line(error)}") from error


def find_runs(client, target: str) -> tuple[list, str | None]:
    """The runs TARGET names, and the parent run id when TARGET is one (None for an experiment)."""
    experiment = client.get_experiment_by_name(target)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return search_all_runs(client, experiment.experiment_id), None
    parent = find_run(client, target)
    if parent is None:
        raise ReportError(f"'{target}' is neither an experiment name nor a run id in {client.tracking_uri}")
    children = search_all_runs(client, parent.info.experiment_id, f"tags.mlflow.parentRunId = '{target}'")
    return children, target


def find_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    runs, page_token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time ASC"],
                                  page_token=page_token)  # fmt: skip
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def curve_metrics(run) -> list[str]:
    """The metrics of a run the report draws as curves: the CURVE_METRICS it has, and its hp/ numbers."""
    hyperparameters = sorted(m for m in run.data.metrics if m.startswith("hp/"))  # scheduled or PBT's
    spreads = [f"{metric}_std" for metric in SPLIT_METRICS]  # a trial's members' (gdlab.sweep.trial_runs)
    return [metric for metric in (*CURVE_METRICS, *spreads, *hyperparameters) if metric in run.data.metrics]


def load_run(client, run, histories: dict | None = None) -> TrackedRun:
    """A run and its curves: from `histories` (read_histories) where given, else from get_metric_history."""
    curves = {}
    for metric in curve_metrics(run):
        if histories is not None:
            history = histories.get((run.info.run_id, metric), [])
        else:
            history = [
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, metric)
            ]
        # A step logged twice (a retried batch) keeps its latest value.
        ordered = sorted(history, key=lambda point: point[:2])  # by (step, timestamp)
        curves[metric] = pd.Series({step: value for step, _, value in ordered}, dtype=float)
    frame = pd.DataFrame(curves).sort_index()
    frame.index.name = "epoch"
    name = run.data.tags.get("mlflow.runName") or run.info.run_name or run.info.run_id
    return TrackedRun(run.info.run_id, name, dict(run.data.params), frame, run.info.status,
                      run.data.tags.get("failure.epoch"), latest=dict(run.data.metrics),
                      tags=dict(run.data.tags))  # fmt: skip


def read_histories(client, runs: list) -> dict | None:
    """{(run id, metric): [(step, timestamp, value), ...]} of every run's curves in one query of MLflow's SQL
    store where gdlab's bulk paths are verified (gdlab.metric_store); None elsewhere (get_metric_history
    then reads each curve)."""
    from gdlab.metric_store import read_metric_histories

    keys = sorted({metric for run in runs for metric in curve_metrics(run)})
    return read_metric_histories(client, [run.info.run_id for run in runs], keys)


def load_runs(client, target: str, children: list | None = None) -> tuple[list[TrackedRun], str | None]:
    runs, parent_id = (children, target) if children is not None else find_runs(client, target)
    # Only training runs log train/loss: a sweep's parent run, in the same experiment, is left out.
    runs = [run for run in runs if "train/loss" in run.data.metrics]
    histories = read_histories(client, runs)
    runs = [load_run(client, run, histories) for run in runs]
    if not runs:
        what = f"run {parent_id} has no child runs" if parent_id else f"experiment '{target}' has no runs"
        raise ReportError(f"{what} with a train/loss metric")
    return runs, parent_id


def read_runs(
    client, uri: str, target: str, children: list | None = None
) -> tuple[list[TrackedRun], str | None]:
    try:
        return load_runs(client, target, children)
    except ReportError:
        raise
    except Exception as error:  # an unreachable server, a store of another MLflow version, ...
        first_line = error_line(error)
        raise ReportError(f"cannot read the MLflow store at {uri}: {first_line}") from error


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


def assign_labels(runs: list[TrackedRun]) -> None:
    keys = differing_params(runs)
    for run in runs:
        parts = [f"{key}={short_number(run.params[key])}" for key in keys if key in run.params]
        run.label = " ".join(parts) or run.name
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


# --- the report ----------------------------------------------------------------------------------------


def describe_target(target: str, parent_run_id: str | None) -> str:
    return f"child runs of parent run {parent_run_id}" if parent_run_id else f"experiment '{target}'"


def write_markdown(report: Report, target: str, figures: list[Path], path: Path) -> Path:
    selected = " (selected on test)" if report.selected_on == "test" else ""
    sections = [
        f"# gdlab report: {describe_target(target, report.parent_run_id)}{selected}",
        f"{len(report.runs)} runs; objective `{report.objective}` ({report.direction}).",
        *report.caveats(),
        "## Train loss and accuracy by epoch",
        markdown_table(report.epoch_table),
        f"## Final metrics, sorted by {report.objective} ({report.direction})",
        "Last logged values: each curve's last point (step = epochs) is measured at the trained weights, "
        "as `final/<metric>` and what gdlab-train prints.",
        markdown_table(report.final_table),
        *markdown_section(report.runs, report.objective, report.direction),
        "## Curves",
        *(f"![{figure.stem.replace('_', ' ')}]({figure.name})" for figure in figures),
    ]
    path.write_text("\n\n".join(sections) + "\n")
    return path


def write_tables(report: Report, out_dir: Path) -> list[Path]:
    """The two tables in full precision, for notebooks and scripts (report.md rounds to 6 digits)."""
    paths = [out_dir / "epoch_table.csv", out_dir / "final_metrics.csv"]
    report.epoch_table.to_csv(paths[0])
    report.final_table.to_csv(paths[1])
    return paths


def log_to_parent(client, parent_run_id: str, out_dir: Path) -> None:
    try:
        client.log_artifacts(parent_run_id, str(out_dir), "report")
    except Exception as error:  # any store or transport error: the report itself is already written
        first_line = error_line(error)
        raise ReportError(
            f"the report is in {out_dir}, but logging it to parent run {parent_run_id} failed: {first_line}",
            status=1,
        ) from error


def build_report(
    target: str,
    tracking_uri: str | None = None,
    out: str | Path | None = None,
    epochs: list[int] | None = None,
    objective: str | None = None,
    log: bool = True,
    children: list | None = None,
) -> Report:
    """Report on experiment `target`, or on the child runs of parent run `target` (`children`: those runs,
    as MLflow's `Run`s, where the caller has just read them all).

    Writes report.md, the tables as CSV and the PNGs to `out` (default reports/<target>); a parent run
    gets them as artifacts under report/ unless `log` is False. Raises ReportError for what a user must
    fix (exit status 2 in the CLI; 1 when only logging to the parent run failed).
    """
    uri = tracking_uri or default_tracking_uri()
    client = make_client(uri)
    runs, parent_run_id = read_runs(client, uri, target, children)
    refits = [run for run in runs if run.tags.get(ROLE_TAG) == REFIT_ROLE]
    runs = [run for run in runs if run not in refits]  # the trials: what the sweep ranked
    if not runs:
        raise ReportError(f"run {parent_run_id} has no trial runs besides its refit")
    load_pbt_records(client, runs)
    assign_labels(runs)
    objective, direction = objective_and_direction(runs, objective)
    final_table = make_final_table(runs, objective, direction)
    position = {label: i for i, label in enumerate(final_table.index)}
    runs = sorted(runs, key=lambda run: position[run.label])  # both tables in the objective's order
    epoch_table = make_epoch_table(runs, sorted(set(epochs)) if epochs else default_epochs(runs))
    report = Report(epoch_table, final_table, objective=objective, direction=direction, runs=runs,
                    parent_run_id=parent_run_id, refit=refits[-1] if refits else None)  # fmt: skip
    if parent_run_id:
        tags = client.get_run(parent_run_id).data.tags
        report.selected_on, report.result = tags.get(SELECTED_ON_TAG), tags.get(RESULT_TAG)

    out_dir = Path(out) if out is not None else default_out_dir(target)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".gdlab-report-probe"
        probe.write_text("")  # writable, before the figures are drawn
        probe.unlink()
    except OSError as error:
        raise ReportError(f"--out {out_dir}: {(error.strerror or str(error)).lower()}") from error
    report.figures = write_figures(runs, out_dir, differing_params(runs), objective, direction,
                                   note=" ".join(report.caveats()).replace("**", ""))  # fmt: skip
    figures = [drawn.path for drawn in report.figures]
    extra = []
    if best := best_member(runs, objective, direction):
        try:
            lineage = plot_lineage(runs, objective, direction, out_dir / "pbt_lineage.png")
            extra = [lineage.path, write_best_schedule(best, objective, out_dir / "pbt_best_schedule.json")]
            report.figures.append(lineage)
        except Exception as error:  # the tables and the other figures are the report; this part is extra
            print(f"gdlab-report: no PBT lineage: {error_line(error)}",
                  file=sys.stderr)  # fmt: skip
    markdown = write_markdown(report, target, figures, out_dir / "report.md")
    report.paths = [markdown, *write_tables(report, out_dir), *figures, *extra]
    if parent_run_id and log:
        log_to_parent(client, parent_run_id, out_dir)
        report.logged_to_parent = True
    return report


def print_report(report: Report, target: str) -> None:
    print(f"gdlab report: {describe_target(target, report.parent_run_id)}, {len(report.runs)} runs")
    print("\ntrain loss and accuracy by epoch")
    print(text_table(report.epoch_table))
    print(f"\nfinal metrics, sorted by {report.objective} ({report.direction})")
    print(text_table(report.final_table))
    for line in report.caveats():
        print("\n" + line.replace("**", ""))
    print(f"\nwritten to {report.paths[0].parent}: " + ", ".join(path.name for path in report.paths))
    if report.logged_to_parent:
        print(f"logged as artifacts of parent run {report.parent_run_id} under report/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gdlab-report",
        description="Compare the runs of an MLflow experiment, or the child runs of a parent run.",
    )
    parser.add_argument("target", help="an experiment name, or a parent run id (its child runs)")
    parser.add_argument(
        "--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<target>)")
    parser.add_argument(
        "--epochs",
        type=parse_epochs,
        help="epochs of the first table, e.g. 0,10,100 (default: 0, 10%%, 50%%, last)",
    )
    parser.add_argument(
        "--objective", help="metric to sort the final table by (default: the runs' objective)"
    )
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args.target, args.tracking_uri, args.out, args.epochs, args.objective,
                              log=not args.no_log)  # fmt: skip
    except ReportError as error:
        print(f"gdlab-report: error: {mask_passwords(str(error))}", file=sys.stderr)
        sys.exit(error.status)
    print_report(report, args.target)
    return 0


if __name__ == "__main__":
    from gdlab.entry import report

    report()
