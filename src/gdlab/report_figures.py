"""gdlab-report's figures: curves per run, and train loss against function evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdlab.report import TrackedRun

PNG_DPI = 80


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
    figure, ax = new_figure()
    for run in runs:
        curves = run.curves.dropna(subset=["train/loss", "evals/total"])
        # evals/total counts the evaluations up to the end of its epoch, while train/loss is measured at
        # the epoch's start: each loss was reached with the previous epoch's total (0 for epoch 0).
        evals_spent = curves["evals/total"].shift(1, fill_value=0.0)
        ax.plot(evals_spent.to_numpy(), curves["train/loss"].to_numpy(), label=run.label)
    return save_figure(figure, ax, path, xlabel="function evaluations (evals/total)", ylabel="train/loss",
                       yscale="log", title="train loss against evaluations")  # fmt: skip


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
