"""gdlab-report's figures, readable from 2 runs to a 64+ run sweep.

- `objective_vs_params.png`: the objective against each varied parameter (the view that answers "which
  lr"), log x where the values span a decade or more; the top 5 starred and labelled.
- `loss_curves.png`, `accuracy_curves.png`: one line per run. Up to LEGEND_RUNS runs, a legend; more,
  coloured by the first varied numeric parameter with a colour bar, the top 5 drawn thick and labelled.
- `loss_vs_evals.png`: train loss against function evaluations, one colour per step-size rule where rules
  differ; of one rule, coloured as the curves, only where epochs spent different numbers of evaluations.
Everywhere pruned runs are dashed and faded, failed or killed runs dotted and faded, labels use 3
significant digits, and a log loss axis is capped at twice the largest starting loss, so a diverging
member cannot flatten the others. Each figure comes with a `Drawn`: the data behind it, for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gdlab.report.rank_labels import mark_ranks, top_box
from gdlab.tracking import short_number

if TYPE_CHECKING:
    from gdlab.report.runs import TrackedRun

PNG_DPI = 100
LEGEND_RUNS = 8  # more runs than this: a colour bar instead of a legend
TOP_K = 5
UNRULED = ("optimizer.name", "optimizer.lr")  # what does not make another rule
OK, PRUNED, FAILED = "ok", "pruned", "failed"


@dataclass
class Drawn:
    """What a figure shows: its file, axis scales, and which runs are drawn how (by run label)."""

    path: Path
    xscale: str = "linear"
    yscale: str = "linear"
    runs: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    no_objective: list[str] = field(default_factory=list)  # finished, without the objective's metric
    legend: list[str] = field(default_factory=list)  # its legend's entries
    top: list[str] = field(default_factory=list)  # best first
    colour_by: str | None = None  # the parameter of the colour bar, if any
    ylim: tuple[float, float] | None = None  # a loss axis' limits, set so diverging runs cannot flatten it
    lineage: list[str] = field(
        default_factory=list
    )  # PBT: the members whose slots trained the best's weights
    title: str = ""  # the figure's title, where it carries the sweep's result or caveat
    spread: list[str] = field(default_factory=list)  # runs drawn with their members' spread (bands, bars)
    rank_labels: list[list[tuple]] = field(default_factory=list)  # each panel's "#rank" label boxes (points)


def run_state(run: TrackedRun) -> str:
    if run.tags.get("optuna.state") == "PRUNED":
        return PRUNED
    if run.status in ("FAILED", "KILLED") or run.diverged_at is not None:
        return FAILED
    return OK


def objective_value(run: TrackedRun, objective: str) -> float:
    value = run.latest.get(objective, math.nan)
    return math.nan if run.diverged_at is not None else float(value)


def ranked(runs: list[TrackedRun], objective: str, direction: str) -> list[TrackedRun]:
    """The runs that finished with a finite objective, best first."""
    scored = [run for run in runs if run_state(run) == OK and math.isfinite(objective_value(run, objective))]
    return sorted(scored, key=lambda run: objective_value(run, objective), reverse=direction == "maximize")


def numeric(runs: list[TrackedRun], key: str) -> list[float] | None:
    try:
        return [float(run.params[key]) for run in runs if key in run.params]
    except ValueError:
        return None


def log_spaced(values: list[float]) -> bool:
    """Positive values spanning a decade or more: drawn on a log axis (as a log-uniform search space)."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 10


def load_matplotlib() -> None:
    """matplotlib's import (~0.4 s of CPU), done once here before figures are drawn in forked children
    (gdlab.forked): each child inherits it instead of paying it again."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def new_figure(width: float = 9.0, height: float = 5.5, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas, not pyplot: a notebook's backend and open figures are left alone.
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=PNG_DPI)
    return path


class Palette:
    """Each run's colour and line style in the curve figures."""

    def __init__(self, runs: list[TrackedRun], varied: list[str], objective: str, direction: str):
        from matplotlib import colormaps
        from matplotlib.colors import LogNorm, Normalize

        self.runs, self.objective, self.varied = runs, objective, varied
        self.top = ranked(runs, objective, direction)[:TOP_K]
        self.legend = len(runs) <= LEGEND_RUNS
        # the colour bar's parameter: the numeric one with the most distinct values (lr, not depth)
        candidates = [k for k in varied if numeric(runs, k) is not None] if not self.legend else []
        self.key = max(candidates, key=lambda k: len(set(numeric(runs, k))), default=None)
        self.norm = self.cmap = None
        self.colours = {}  # run id: its colour bar colour, mapped for every run at once
        if self.key is not None:
            values = numeric(runs, self.key)
            self.norm = (LogNorm if log_spaced(values) else Normalize)(min(values), max(values))
            self.cmap = colormaps["viridis"]
            coloured = [run for run in runs if self.key in run.params]
            rgba = self.cmap(self.norm([float(run.params[self.key]) for run in coloured]))
            self.colours = {run.run_id: tuple(colour) for run, colour in zip(coloured, rgba, strict=True)}

    def colour(self, index: int, run: TrackedRun):
        return self.colours.get(run.run_id, f"C{index % 10}")

    def style(self, index: int, run: TrackedRun) -> dict:
        state = run_state(run)
        style = {"color": self.colour(index, run), "linewidth": 1.2, "alpha": 0.85}
        if state == PRUNED:
            style.update(linestyle="--", alpha=0.35)
        elif state == FAILED:
            style.update(linestyle=":", alpha=0.35, color="0.45")
        if run in self.top and not self.legend:
            style.update(linewidth=2.4, alpha=1.0, zorder=3)
        if self.legend:
            style["label"] = run.label + {PRUNED: " (pruned)", FAILED: f" ({run.outcome})"}.get(state, "")
        return style

    def finish(self, figure, ax, drawn: Drawn) -> None:
        """The legend or the colour bar, and the drawn runs' record."""
        if self.legend:
            ax.legend(fontsize="small")
        elif self.key is not None:
            from matplotlib.cm import ScalarMappable

            figure.colorbar(ScalarMappable(norm=self.norm, cmap=self.cmap), ax=ax, label=self.key)
            drawn.colour_by = self.key
        drawn.runs = [run.label for run in self.runs]
        drawn.pruned = [run.label for run in self.runs if run_state(run) == PRUNED]
        drawn.failed = [run.label for run in self.runs if run_state(run) == FAILED]
        drawn.top = [run.label for run in self.top]


def top_name(run: TrackedRun, varied: list[str]) -> str:
    """A top run as the values it differs in: every varied parameter it has (a parameter such as init.std
    exists only for some runs of a sweep), else its label."""
    values = [f"{key}={short_number(run.params[key])}" for key in varied if key in run.params]
    return " ".join(values) or run.label


def label_top(ax, palette: Palette, x: dict, y: dict, objective: str) -> list[tuple]:
    """Rank the top runs at their last point, and list them with their value and objective; the rank
    labels' boxes (mark_ranks)."""
    if palette.legend or not palette.top:
        return []
    lines = []
    for rank, run in enumerate(palette.top, 1):
        name = top_name(run, palette.varied)
        lines.append(f"#{rank} {name}: {run.latest.get(objective, math.nan):.3g}")
    top_box(ax, lines, f"top {len(lines)} by {objective}")
    ends = [
        (rank, x[run.run_id], y[run.run_id]) for rank, run in enumerate(palette.top, 1) if run.run_id in x
    ]
    return mark_ranks(ax, ends)


def add_lines(ax, lines: list[tuple]) -> None:
    """Many runs' curves as one LineCollection: the same picture as a Line2D each, one artist instead of
    64 (measured: no faster beyond this machine's noise; the figures' cost is text and tick layout)."""
    if not lines:
        return
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    styles = [style for _, style in lines]
    collection = LineCollection(
        [points for points, _ in lines],
        colors=[to_rgba(style["color"], style["alpha"]) for style in styles],
        linewidths=[style["linewidth"] for style in styles],
        linestyles=[style.get("linestyle", "-") for style in styles],
    )
    ax.add_collection(collection, autolim=True)
    ax.autoscale_view()


def loss_limits(runs: list[TrackedRun], metric: str) -> tuple[float, float] | None:
    """A log loss axis from the smallest loss to twice the largest starting one (diverging runs clipped)."""
    curves = [run.curves[metric].dropna() for run in runs if metric in run.curves]
    values = [v for curve in curves for v in curve.to_numpy() if math.isfinite(v) and v > 0]
    starts = [float(curve.iloc[0]) for curve in curves if len(curve) and math.isfinite(curve.iloc[0])]
    if not values or not starts:
        return None
    return min(values) * 0.8, max(max(starts) * 2, min(values) * 10)


def plot_curves(
    runs, metric: str, palette: Palette, path: Path, x_metric: str | None = None, **axis
) -> Drawn:
    """`metric` of each run against epochs (or against `x_metric`'s curve)."""
    figure, (ax,) = new_figure(10 if not palette.legend else 9)
    drawn = Drawn(path, yscale="log" if metric.endswith("loss") else "linear")
    ends_x, ends_y = {}, {}
    plain: list[tuple] = []  # (points, style) of the runs drawn together as one collection
    for index, run in enumerate(runs):
        columns = [metric] + ([x_metric] if x_metric else [])
        if not set(columns) <= set(run.curves):
            continue
        curve = run.curves[columns].dropna()
        if x_metric:  # evals/total counts up to its epoch's end, the loss is taken at its start
            x = curve[x_metric].shift(1, fill_value=0.0).to_numpy()
        else:
            x = curve.index.to_numpy()
        y = curve[metric].to_numpy()
        if not len(x):
            continue
        ends_x[run.run_id], ends_y[run.run_id] = x[-1], y[-1]
        style = palette.style(index, run)
        spread = f"{metric}_std"
        banded = spread in run.curves and not x_metric  # a trial's members: their mean, and a band of one std
        if not (palette.legend or banded or run in palette.top):
            plain.append((np.column_stack([x, y]), style))
            continue
        (line,) = ax.plot(x, y, **style)
        if banded:
            std = run.curves[spread].reindex(curve.index).to_numpy()
            ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.15, linewidth=0)
            drawn.spread.append(run.label)
    add_lines(ax, plain)
    ax.set(yscale=drawn.yscale, xlabel=x_metric or "epoch (step k: the weights after k steps)", ylabel=metric,
           **axis)  # fmt: skip
    if drawn.yscale == "log" and (limits := loss_limits(runs, metric)):
        ax.set_ylim(*limits)
        drawn.ylim = limits
    drawn.rank_labels = [label_top(ax, palette, ends_x, ends_y, palette.objective)]
    ax.grid(True, alpha=0.3)
    palette.finish(figure, ax, drawn)
    save(figure, path)
    return drawn


def legend_kind(state: str, score: float) -> str:
    """How a run is drawn against the params: the legend's entry."""
    if state == FAILED:
        return "failed (no objective)"
    if not math.isfinite(score):
        return "no objective"
    return "pruned" if state == PRUNED else "finished"


MARKS = {  # how plot_objective_vs_params marks each legend_kind
    "finished": {"color": "tab:blue", "s": 30},
    "pruned": {"facecolors": "none", "edgecolors": "0.5", "s": 30},
    "failed (no objective)": {"marker": "x", "color": "tab:red", "s": 40},
    "no objective": {"marker": "|", "color": "0.5", "s": 60},
}
EDGE_KINDS = ("failed (no objective)", "no objective")  # drawn on the top edge: they have no value


def plot_objective_vs_params(runs, varied: list[str], objective: str, direction: str,
                             path: Path, note: str = "") -> Drawn:  # fmt: skip
    """One panel per varied parameter (at most 4): each run's objective at that parameter's value."""
    keys = varied[:4]
    figure, axes = new_figure(9 if len(keys) == 1 else min(6 * len(keys), 18), 5.5, columns=len(keys))
    scores = [objective_value(run, objective) for run in runs]
    finite = [s for s in scores if math.isfinite(s)]
    yscale = "log" if objective.endswith("loss") and log_spaced(finite) else "linear"
    top = ranked(runs, objective, direction)[:TOP_K]
    drawn = Drawn(path, yscale=yscale, top=[run.label for run in top])
    for ax, key in zip(axes, keys, strict=False):
        values = numeric(runs, key)
        categorical = values is None
        xscale = "log" if not categorical and log_spaced(values) else "linear"
        categories = sorted({run.params[key] for run in runs if key in run.params}) if categorical else []
        ceiling = max(finite) * (2 if yscale == "log" else 1.05) if finite else 1.0
        points: dict[str, list] = {kind: [] for kind in MARKS}  # one scatter per kind: 64 runs, 4 artists
        bars = []  # (x, score, below, above): a trial's members' 95% interval
        for run, score in zip(runs, scores, strict=True):
            if key not in run.params:
                continue
            x = categories.index(run.params[key]) if categorical else float(run.params[key])
            kind = legend_kind(run_state(run), score)
            points[kind].append((x, ceiling if kind in EDGE_KINDS else score))  # no objective: the top edge
            low, high = (run.latest.get(f"{objective}_ci_{end}", math.nan) for end in ("low", "high"))
            if kind == "finished" and math.isfinite(low) and math.isfinite(high):
                bars.append((x, score, max(score - low, 0), max(high - score, 0)))
                if key == keys[0]:
                    drawn.spread.append(run.label)
        for kind, xy in points.items():
            if xy:
                ax.scatter(*zip(*xy, strict=True), zorder=2, **MARKS[kind])
        if bars:
            x, y, below, above = zip(*bars, strict=True)
            ax.errorbar(x, y, yerr=[below, above], fmt="none", ecolor="tab:blue", alpha=0.5, capsize=2,
                        zorder=1)  # fmt: skip
        lines, stars = [], []
        for rank, run in enumerate(top, 1):
            if key in run.params:
                x = categories.index(run.params[key]) if categorical else float(run.params[key])
                score = objective_value(run, objective)
                ax.scatter(x, score, marker="*", color="tab:orange", edgecolors="k", s=160, zorder=3)
                stars.append((rank, x, score))
                lines.append(f"#{rank} {short_number(run.params[key])}: {score:.3g}")
        top_box(ax, lines, f"top {len(lines)}: {key.rsplit('.', 1)[-1]}: {objective.rsplit('/', 1)[-1]}")
        if categorical:
            ax.set_xticks(range(len(categories)), [short_number(c) for c in categories], rotation=30)
        elif xscale == "linear" and all(v.is_integer() for v in values):  # depth, width: whole numbers
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xscale=xscale, yscale=yscale, xlabel=key, ylabel=objective)
        ax.grid(True, alpha=0.3)
        drawn.rank_labels.append(mark_ranks(ax, stars))
        drawn.xscale = xscale if key == keys[0] else drawn.xscale
    from matplotlib.lines import Line2D

    kinds = {legend_kind(run_state(run), score) for run, score in zip(runs, scores, strict=True)}
    handles = [Line2D([], [], marker="o", linestyle="", color="tab:blue", label="finished"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="0.5", label="pruned"),
               Line2D([], [], marker="x", linestyle="", color="tab:red", label="failed (no objective)"),
               Line2D([], [], marker="|", linestyle="", color="0.5", markersize=10, label="no objective"),
               Line2D([], [], marker="*", linestyle="", color="tab:orange", markersize=12,
                      label=f"top {len(top)} ({direction})")]  # fmt: skip
    handles = [h for h in handles if h.get_label() in kinds or h.get_label().startswith("top")]
    axes[0].legend(handles=handles, fontsize="small", loc="lower left")  # only what the figure shows
    drawn.legend = [h.get_label() for h in handles]
    drawn.no_objective = [run.label for run, score in zip(runs, scores, strict=True)
                          if legend_kind(run_state(run), score) == "no objective"]  # fmt: skip
    bars = " (bars: 95% interval over each trial's folds and seeds)" if drawn.spread else ""
    drawn.title = f"{objective} against what the runs vary ({len(runs)} runs){bars}"
    drawn.title += f"\n{note}" if note else ""
    figure.suptitle(drawn.title, fontsize=10 if note else None)
    drawn.runs = [run.label for run in runs]
    drawn.pruned = [run.label for run in runs if run_state(run) == PRUNED]
    drawn.failed = [run.label for run in runs if run_state(run) == FAILED]
    save(figure, path)
    return drawn


def plot_loss_vs_evals(runs: list[TrackedRun], path: Path) -> Drawn:
    """One colour per step-size rule (every seed and lr of a rule in it): the rules side by side."""
    figure, (ax,) = new_figure()
    colours: dict[str, str] = {}
    for run, rule in zip(runs, rule_labels(runs), strict=True):
        curves = run.curves.dropna(subset=["train/loss", "evals/total"])
        # evals/total counts the evaluations up to the end of its epoch, while train/loss is measured at
        # the epoch's start: each loss was reached with the previous epoch's total (0 for epoch 0).
        evals_spent = curves["evals/total"].shift(1, fill_value=0.0)
        first = rule not in colours
        colour = colours.setdefault(rule, f"C{len(colours) % 10}")
        ax.plot(evals_spent.to_numpy(), curves["train/loss"].to_numpy(), color=colour, alpha=0.75,
                linewidth=1.2, label=rule if first else None)  # fmt: skip
    ax.set(xlabel="function evaluations (evals/total)", ylabel="train/loss", yscale="log",
           title="train loss against evaluations, one colour per rule")  # fmt: skip
    if limits := loss_limits(runs, "train/loss"):
        ax.set_ylim(*limits)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save(figure, path)
    return Drawn(path, yscale="log", runs=[run.label for run in runs])


def rule_labels(runs: list[TrackedRun]) -> list[str]:
    """Each run's step-size rule: optimizer.name, and the optimizer.* values (not lr) that tell apart
    runs of one name (e.g. backtracking's trial_eval)."""
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.params.get("optimizer.name", "?"), []).append(run)
    labels = []
    for run in runs:
        name = run.params.get("optimizer.name", "?")
        peers = by_name[name]
        keys = sorted(k for k in run.params if k.startswith("optimizer.") and k not in UNRULED
                      and len({peer.params.get(k) for peer in peers}) > 1)  # fmt: skip
        labels.append(" ".join([name, *(f"{k.removeprefix('optimizer.')}={run.params[k]}" for k in keys)]))
    return labels


def optimizers_differ(runs: list[TrackedRun]) -> bool:
    return len({run.params.get("optimizer.name") for run in runs}) > 1


def objective_figure(runs: list[TrackedRun], out_dir: Path, varied: list[str], objective: str,
                     direction: str, note: str = "") -> list[Callable[[], Drawn]]:  # fmt: skip
    """The objective against the varied parameters (none for a single run or nothing varied), as a drawing
    still to be done; `note`: the sweep's result or caveat, on its title."""
    if not varied or len(runs) < 2:
        return []
    path = out_dir / "objective_vs_params.png"
    return [lambda: plot_objective_vs_params(runs, varied, objective, direction, path, note)]


def curve_figures(runs: list[TrackedRun], out_dir: Path, varied: list[str], objective: str,
                  direction: str) -> list[Callable[[], Drawn]]:  # fmt: skip
    """The curve figures, as drawings still to be done (gdlab.forked draws them on other cores)."""
    palette = Palette(runs, varied, objective, direction)
    drawings = [
        lambda: plot_curves(runs, "train/loss", palette, out_dir / "loss_curves.png", title="train loss"),
        lambda: plot_curves(
            runs, "train/acc", palette, out_dir / "accuracy_curves.png", title="train accuracy"
        ),
    ]
    selected_curve = objective.removeprefix("final/")
    if selected_curve.startswith("val/") and any(selected_curve in run.curves for run in runs):
        name = "validation loss" if selected_curve.endswith("loss") else "validation accuracy"
        drawings.append(lambda: plot_curves(runs, selected_curve, palette, out_dir / "validation_curves.png",
                                            title=f"{name}: what the trials are ranked on"))  # fmt: skip
    if all("evals/total" in run.curves for run in runs):
        path = out_dir / "loss_vs_evals.png"
        if optimizers_differ(runs):
            drawings.append(lambda: plot_loss_vs_evals(runs, path))
        elif len(runs) > 1 and len(set().union(*(run.evals_per_epoch for run in runs))) > 1:
            drawings.append(lambda: plot_curves(runs, "train/loss", palette, path, x_metric="evals/total",
                                                title="train loss against function evaluations"))  # fmt: skip
    return drawings


def write_figures(runs: list[TrackedRun], out_dir: Path, varied: list[str], objective: str,
                  direction: str, note: str = "") -> list[Drawn]:  # fmt: skip
    """Every figure of the report, drawn on the cores this process may use; `varied`: the params the runs
    differ in, most telling first; `note`: the sweep's result or caveat, on the objective figure's title."""
    from gdlab.forked import in_parallel

    load_matplotlib()
    return in_parallel([*objective_figure(runs, out_dir, varied, objective, direction, note),
                        *curve_figures(runs, out_dir, varied, objective, direction)])  # fmt: skip
