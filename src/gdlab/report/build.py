"""`gdlab-report`: compare the runs of an experiment, or the child runs of a sweep, from MLflow alone.

    gdlab-report TARGET [--tracking-uri URI] [--out DIR] [--epochs 0,10,100] [--objective METRIC] [--no-log]

TARGET is an experiment name or a parent run id. The report is two tables (train loss and accuracy at
chosen epochs, in the labs' style, and the final metrics sorted by the objective), printed and written
to DIR/report.md (and as CSV) with the curves as PNGs. A parent run also gets the folder as artifacts
under report/. In a notebook: ``build_report("moons", tracking_uri=...)`` returns the tables as DataFrames.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gdlab import import_gc
from gdlab.masking import error_line, mask_passwords
from gdlab.report.figures import curve_figures, load_matplotlib, objective_figure, write_figures
from gdlab.report.pbt import (
    best_member,
    load_pbt_records,
    markdown_section,
    plot_lineage,
    write_best_schedule,
)
from gdlab.report.runs import ReportError, TrackedRun, default_tracking_uri, make_client, read_runs
from gdlab.report.tables import (
    assign_labels,
    default_epochs,
    differing_params,
    make_epoch_table,
    make_final_table,
    markdown_table,
    objective_and_direction,
    parse_epochs,
    text_table,
)
from gdlab.tracking import REFIT_ROLE, RESULT_TAG, ROLE_TAG, SELECTED_ON_TAG


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


def default_out_dir(target: str) -> Path:
    return Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "_", target)


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


@dataclass
class PendingReport:
    """A report read and tabled, whose curve figures a forked child draws (gdlab.forked) while the caller
    goes on (a sweep: its refit); `finish_report` ends it."""

    report: Report
    target: str
    client: object  # MLflow's client on the store the runs were read from
    out_dir: Path
    curves: object  # gdlab.forked.Forked: the curve figures' `Drawn`s


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
    report, client, out_dir = read_report(target, tracking_uri, out, epochs, objective, children)
    report.figures = write_figures(report.runs, out_dir, differing_params(report.runs), report.objective,
                                   report.direction, note=note_of(report))  # fmt: skip
    return write_report(report, target, client, out_dir, log)


def start_report(target: str, tracking_uri: str | None = None, out: str | Path | None = None,
                 objective: str | None = None, children: list | None = None,
                 client=None) -> PendingReport:  # fmt: skip
    """`build_report`'s first part: the runs read and tabled, the curve figures started in a forked child.
    The objective figure waits for `finish_report`: its title carries the parent's result, set meanwhile."""
    from gdlab.forked import Forked

    report, client, out_dir = read_report(target, tracking_uri, out, None, objective, children, client)
    drawings = curve_figures(report.runs, out_dir, differing_params(report.runs), report.objective,
                             report.direction)  # fmt: skip
    load_matplotlib()  # before the fork: the child, Optuna's plots' child and this process share it
    curves = Forked(lambda: [draw() for draw in drawings])
    return PendingReport(report, target, client, out_dir, curves)


def finish_report(pending: PendingReport, log: bool = True) -> Report:
    """`build_report`'s second part: the parent's caveats read again, the objective figure, the files."""
    report = pending.report
    try:
        if report.parent_run_id:
            read_caveats(pending.client, report)
        drawings = objective_figure(report.runs, pending.out_dir, differing_params(report.runs),
                                    report.objective, report.direction, note_of(report))  # fmt: skip
        report.figures = [draw() for draw in drawings] + pending.curves.result()
    finally:
        pending.curves.cancel()
    return write_report(report, pending.target, pending.client, pending.out_dir, log)


def read_report(target: str, tracking_uri: str | None, out: str | Path | None, epochs: list[int] | None,
                objective: str | None, children: list | None,
                client=None) -> tuple[Report, object, Path]:  # fmt: skip
    """The runs (without the refit) and both tables, the parent's caveats, and a writable output folder.
    `client`: the one `children` were read with (a sweep's, gdlab.writer_client), else one is opened."""
    uri = tracking_uri or default_tracking_uri()
    client = client or make_client(uri)
    import_gc.resume()  # gdlab-report's imports (MLflow's) are done (gdlab.import_gc)
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
        read_caveats(client, report)
    out_dir = Path(out) if out is not None else default_out_dir(target)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".gdlab-report-probe"
        probe.write_text("")  # writable, before the figures are drawn
        probe.unlink()
    except OSError as error:
        raise ReportError(f"--out {out_dir}: {(error.strerror or str(error)).lower()}") from error
    return report, client, out_dir


def read_caveats(client, report: Report) -> None:
    tags = client.get_run(report.parent_run_id).data.tags
    report.selected_on, report.result = tags.get(SELECTED_ON_TAG), tags.get(RESULT_TAG)


def note_of(report: Report) -> str:
    """What the objective figure's title says under it: the caveats, in plain text."""
    return " ".join(report.caveats()).replace("**", "")


def write_report(report: Report, target: str, client, out_dir: Path, log: bool) -> Report:
    """The PBT lineage (where there is one), report.md, the tables, and the folder on the parent run."""
    runs, objective, direction = report.runs, report.objective, report.direction
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
    if report.parent_run_id and log:
        log_to_parent(client, report.parent_run_id, out_dir)
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
