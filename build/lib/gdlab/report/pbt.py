"""gdlab-report on a Population Based Training sweep: the lineage figure, and the best member's schedule.

Read from MLflow alone: each member's run has its own slot's hyperparameters as per-epoch curves
(`hp/optimizer.lr`), and pbt.json (gdlab.pbt's member record: exploits, lineage, schedule, replay) as
an artifact.

- `pbt_lineage.png`: top, one row per member (best at the top), coloured by its hyperparameter epoch by
  epoch, with a grey link at each copy from donor to member and the best member's lineage in black;
  below, each hyperparameter against epochs: every member's own in grey, the best member's schedule
  (the values its weights were trained with) in colour.
- `pbt_best_schedule.json`: that schedule, and the overrides that replay it as a single run.
"""

from __future__ import annotations

import json
import math
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gdlab.report.figures import Drawn, log_spaced, new_figure, ranked, save
from gdlab.tracking import short_number

if TYPE_CHECKING:
    from gdlab.report.runs import TrackedRun

PBT_TAG = "pbt.member"  # gdlab.fit tags each PBT member's run with its slot


def load_pbt_records(client, runs: list[TrackedRun]) -> None:
    """Each PBT member's pbt.json onto its TrackedRun (`run.pbt`); other runs keep None."""
    with tempfile.TemporaryDirectory() as folder:
        for run in runs:
            if PBT_TAG in run.tags:
                try:
                    path = client.download_artifacts(run.run_id, "pbt.json", folder)
                    run.pbt = json.loads(Path(path).read_text())
                except Exception:  # a record that did not reach the store whole: left out of PBT's part
                    continue


def pbt_runs(runs: list[TrackedRun]) -> list[TrackedRun]:
    return [run for run in runs if run.pbt is not None]


def best_member(runs: list[TrackedRun], objective: str, direction: str) -> TrackedRun | None:
    members = pbt_runs(runs)
    best = ranked(members, objective, direction)
    return best[0] if best else None


def replay_command(record: dict) -> str:
    return "gdlab-train " + " ".join(shlex.quote(o) for o in record["replay"])


def plot_lineage(runs: list[TrackedRun], objective: str, direction: str, path: Path) -> Drawn:
    """See the module docstring. Members that did not finish are drawn too, below the ranked ones."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    members = pbt_runs(runs)
    order = ranked(members, objective, direction)
    order += [run for run in members if run not in order]
    row = {run.run_id: i for i, run in enumerate(order)}
    keys, best = list(order[0].pbt["schedule"]), order[0]
    epochs = max(run.epochs for run in order)

    figure, _ = new_figure(11, 4 + 0.18 * len(order) + 2.2 * len(keys))
    figure.clear()
    # the colour bar has its own narrow column, so that every panel has the same width and epochs line up
    grid = figure.add_gridspec(1 + len(keys), 2, width_ratios=[1, 0.015],
                               height_ratios=[max(3.0, 0.18 * len(order))] + [2.2] * len(keys))  # fmt: skip
    lineage_ax = figure.add_subplot(grid[0, 0])
    key = keys[0]
    values = [v for run in order if f"hp/{key}" in run.curves for v in run.curves[f"hp/{key}"].dropna()]
    values = values or [value for _, value in best.pbt["schedule"][key]]  # hp curves lost in an outage
    norm = (LogNorm if log_spaced(values) else Normalize)(min(values), max(values))
    cmap = colormaps["viridis"]
    draw_member_rows(lineage_ax, order, row, key, lambda v: cmap(norm(v)))
    copies = draw_copies(lineage_ax, order, row)
    draw_best_lineage(lineage_ax, best, row, epochs)
    lineage_ax.set(xlim=(0, epochs), ylim=(len(order) - 0.5, -0.5), xlabel="epoch",
                   title=f"PBT lineage: {len(order)} members, {copies} cop{'y' if copies == 1 else 'ies'}, "
                         f"best by {objective} at the top\narrow: a copy, donor -> member; black: the best "
                         f"member's lineage ({best.label})")  # fmt: skip
    lineage_ax.set_yticks(range(len(order)), [run.label for run in order], fontsize=7)
    lineage_ax.set_ylabel("member (the values it started with)")
    scales = [
        draw_schedule(figure.add_subplot(grid[i, 0], sharex=lineage_ax), order, best, key, epochs,
                      values if i == 1 else None)
        for i, key in enumerate(keys, start=1)
    ]  # fmt: skip
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=figure.add_subplot(grid[0, 1]), label=key)
    save(figure, path)
    in_lineage = {part["run_id"] for part in best.pbt["lineage"]}
    return Drawn(path, yscale=scales[0], runs=[run.label for run in order], top=[best.label],
                 lineage=[run.label for run in order if run.run_id in in_lineage])  # fmt: skip


def draw_member_rows(ax, order: list[TrackedRun], row: dict, key: str, colour) -> None:
    """One row per member, coloured epoch by epoch by the value its own slot trained with."""
    from matplotlib.collections import LineCollection

    for run in order:
        curve = run.curves[f"hp/{key}"].dropna() if f"hp/{key}" in run.curves else None
        if curve is None or not len(curve):
            continue
        y = row[run.run_id]
        segments = [[(e, y), (e + 1, y)] for e in curve.index]
        ax.add_collection(LineCollection(segments, colors=colour(curve.to_numpy()), linewidths=3.5))


def draw_copies(ax, order: list[TrackedRun], row: dict) -> int:
    """An arrow from donor to member at each copy's epoch; how many were drawn."""
    copies = 0
    for run in order:
        for event in run.pbt["exploits"]:
            donor = row.get(event["donor_run_id"])
            if donor is not None:
                arrow = {
                    "arrowstyle": "->",
                    "color": "0.45",
                    "linewidth": 0.6,
                    "connectionstyle": "arc3,rad=0.25",
                }  # curved: a round's copies do not stack
                ax.annotate("", (event["epoch"], row[run.run_id]), (event["epoch"], donor), arrowprops=arrow)
                copies += 1
    return copies


def draw_best_lineage(ax, best: TrackedRun, row: dict, epochs: int) -> None:
    """The black path: whose row held the best member's weights, over which epochs."""
    lineage = best.pbt["lineage"]
    ends = [part["from_epoch"] for part in lineage[1:]] + [epochs]
    xs, ys = [], []
    for part, end in zip(lineage, ends, strict=True):
        y = row.get(part["run_id"], math.nan)
        xs += [part["from_epoch"], end]
        ys += [y, y]
    ax.plot(xs, ys, color="black", linewidth=1.6, zorder=3)  # the title says what it is


def draw_schedule(ax, order: list[TrackedRun], best: TrackedRun, key: str, epochs: int,
                  values: list[float] | None) -> str:  # fmt: skip
    """Every member's own `key` in grey, the best member's schedule in colour; the y scale chosen (from
    `values`, else from the schedule)."""
    from matplotlib.collections import LineCollection

    levels = [segment for run in order for segment in constant_stretches(run, key)]
    ax.add_collection(LineCollection(levels, colors="0.6", linewidths=0.8, label=f"each member's own {key}"))
    schedule = best.pbt["schedule"][key]
    xs = [epoch for epoch, _ in schedule] + [epochs]
    ys = [value for _, value in schedule] + [schedule[-1][1]]
    ax.step(xs, ys, where="post", color="C3", linewidth=2.2, label=f"the best member's schedule ({key})")
    scale = "log" if log_spaced(values if values is not None else ys) else "linear"
    ax.set(yscale=scale, ylabel=key, xlabel="epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return scale


def constant_stretches(run: TrackedRun, key: str) -> list[list[tuple[float, float]]]:
    """A member's own `hp/<key>` curve as level segments [(start, v), (end, v)], without the jumps."""
    if f"hp/{key}" not in run.curves:
        return []
    curve = run.curves[f"hp/{key}"].dropna()
    segments, start = [], None
    epochs, values = curve.index.to_list(), curve.to_list()
    for i, (epoch, value) in enumerate(zip(epochs, values, strict=True)):
        start = epoch if start is None else start
        last = i + 1 == len(values) or values[i + 1] != value or epochs[i + 1] != epoch + 1
        if last:
            segments.append([(start, value), (epoch + 1, value)])
            start = None
    return segments


def write_best_schedule(best: TrackedRun, objective: str, path: Path) -> Path:
    record = best.pbt
    path.write_text(json.dumps({
        "run_id": best.run_id, "run_name": best.name, "objective": objective,
        "value": best.latest.get(objective), "schedule": record["schedule"], "replay": record["replay"],
        "command": replay_command(record)}, indent=1))  # fmt: skip
    return path


def markdown_section(runs: list[TrackedRun], objective: str, direction: str) -> list[str]:
    """The report's PBT section (none for runs without PBT)."""
    best = best_member(runs, objective, direction)
    if best is None:
        return []
    record, members = best.pbt, pbt_runs(runs)
    settings = record["settings"]
    copies = sum(len(run.pbt["exploits"]) for run in members)
    lines = [
        "## Population Based Training",
        f"{len(members)} members; every {settings['interval']} epochs the bottom {settings['fraction']:g} "
        f"copied a member of the top {settings['fraction']:g} (weights and optimizer state) and perturbed "
        f"its values by {settings['perturb']} or resampled them (p={settings['resample_probability']:g}); "
        f"{copies} copies in all. A run's params are the values it started with; its `hp/` curves, the "
        "values its own slot trained with.",
        f"The best member, `{best.label}` ({objective} {short_number(best.latest.get(objective, math.nan))}),"
        " "
        f"holds weights trained by {len(record['lineage'])} members in turn. Its schedule:",
    ]
    for key, points in record["schedule"].items():
        lines.append("| from epoch | " + key + " |\n| ---: | ---: |\n" +
                     "\n".join(f"| {epoch} | {value:.6g} |" for epoch, value in points))  # fmt: skip
    lines.append(f"Replay it as one run:\n\n```\n{replay_command(record)}\n```")
    lines.append("![pbt lineage](pbt_lineage.png)")
    return lines
