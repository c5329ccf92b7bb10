"""Optuna's own plots of a sweep's study, as PNGs under optuna/ on the sweep's parent run.

They are drawn in a forked child (gdlab.forked) while the sweep's refit trains, from an in-memory copy of
the study's trials: the child must not use the parent's connections to the Optuna storage.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gdlab.forked import Forked
from gdlab.masking import error_line

if TYPE_CHECKING:
    import optuna

# Not drawn for one searched parameter: those that compare parameters have nothing to compare (its
# importance is 1, one axis, no pair), and its slice is the sweep report's objective_vs_params.png.
ONE_PARAM_SKIPS = ("param_importances", "parallel_coordinate", "contour", "slice")


class StudyPlots:
    """The plots being drawn into a temporary folder; `log` puts them on the parent run."""

    def __init__(self, study: optuna.Study):
        self.folder = Path(tempfile.mkdtemp(prefix="gdlab-optuna-plots-"))
        copy = in_memory_copy(study)
        self.drawing = Forked(lambda: draw_plots(copy, self.folder),
                              orphaned=lambda: shutil.rmtree(self.folder, ignore_errors=True))  # fmt: skip

    def log(self, client, parent_run_id: str) -> None:
        try:
            for line in self.drawing.result():
                print(f"gdlab-sweep: {line}")
            client.log_artifacts(parent_run_id, str(self.folder), "optuna")
        finally:
            self.cancel()

    def cancel(self) -> None:
        self.drawing.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


def in_memory_copy(study: optuna.Study) -> optuna.Study:
    """The study's trials and metric names in an in-memory study (Optuna's own `add_trials`)."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."
    try:
        copy = optuna.create_study(study_name=study.study_name, directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    copy.add_trials(study.get_trials(deepcopy=False))
    if study.metric_names:
        copy.set_metric_names(study.metric_names)
    return copy


def draw_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optuna's plots as PNGs in `folder`; a line for each plot that could not be drawn (e.g. importances
    need two completed trials)."""
    import matplotlib.pyplot as plt  # optuna's plots draw through pyplot
    import optuna
    from optuna.visualization import matplotlib as plots

    makers = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
        "slice": plots.plot_slice,
        "contour": plots.plot_contour,
    }
    if len({name for trial in study.get_trials(deepcopy=False) for name in trial.params}) < 2:
        makers = {name: make for name, make in makers.items() if name not in ONE_PARAM_SKIPS}
    skipped = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "Param X unique value length is less than 2."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's, on the axis of a one-valued parameter
        for name, make in makers.items():
            try:
                make(study)
                plt.gcf().set_size_inches(10, 6)
                plt.savefig(folder / f"{name}.png", dpi=80, bbox_inches="tight")
            except Exception as error:
                skipped.append(f"no {name} plot: {error_line(error)}")
            finally:
                plt.close("all")
    optuna.logging.set_verbosity(verbosity)
    return skipped
