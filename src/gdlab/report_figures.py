"""gdlab-report's figures: curves per run, and train loss against function evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdlab.report import TrackedRun

PNG_DPI = 80
UNRULED = ("optimizer.name", "optimizer.lr")  # what does not make another rule


def new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas, not pyplot: a notebook's backend and open figures are left alone.
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_figure(figure, ax, path: Path, **axis_settings) -> Path:
    ax.set(**axis_settings)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=PNG_DPI)
    return path


def plot_metric(runs: list[TrackedRun], metric: str, path: Path, **axis_settings) -> Path:
    figure, ax = new_figure()
    for run in runs:
        if metric in run.curves:
            curve = run.curves[metric].dropna()
            ax.plot(curve.index, curve.to_numpy(), label=run.label)
    return save_figure(figure, ax, path, xlabel="epoch", ylabel=metric, **axis_settings)


def plot_loss_vs_evals(runs: list[TrackedRun], path: Path) -> Path:
    """One colour per step-size rule (every seed and lr of a rule in it): the rules side by side."""
    figure, ax = new_figure()
    figure.set_size_inches(9, 5)
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
    return save_figure(figure, ax, path, xlabel="function evaluations (evals/total)", ylabel="train/loss",
                       yscale="log", title="train loss against evaluations, one colour per rule")  # fmt: skip


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


def write_figures(runs: list[TrackedRun], out_dir: Path) -> list[Path]:
    paths = [
        plot_metric(runs, "train/loss", out_dir / "loss_curves.png", yscale="log", title="train loss"),
        plot_metric(runs, "train/acc", out_dir / "accuracy_curves.png", title="train accuracy"),
    ]
    if optimizers_differ(runs) and all("evals/total" in run.curves for run in runs):
        paths.append(plot_loss_vs_evals(runs, out_dir / "loss_vs_evals.png"))
    return paths
