"""What a run leaves in its output directory: config, overrides, history, plots and weights."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # not pyplot: a notebook's own backend and figures stay untouched

from gdlab.data import Dataset
from gdlab.model import MLP

MAX_OPEN_FILES = 256  # a population of thousands stays well inside the usual limit of 1024 open files
WAIT_SECONDS = 1.0  # how often the rows of members past MAX_OPEN_FILES are appended (opening 768 files per
# epoch would cost P = 1024 more than its training)


class HistoryFiles:
    """An epoch sink (gdlab.module.EpochSink): each member's history row goes to <its directory>/history.csv
    as soon as the epoch ends, flushed, so a kill -9 leaves every finished epoch on disk (members past the
    first MAX_OPEN_FILES: every finished epoch but those of the last WAIT_SECONDS). A file that holds
    all of its member's rows at the end is complete (`complete`); any other is rewritten (`write_history`).
    A member without a directory (None) keeps no file."""

    def __init__(self, directories: list[Path | None]):
        self.directories = directories
        self.has_directory = np.array([d is not None for d in directories])
        self.any_directory = bool(self.has_directory.any())  # asked every epoch
        self.files: dict[int, object] = {}  # kept open, up to MAX_OPEN_FILES
        self.started: set[int] = set()
        self.rows = [0] * len(directories)  # rows appended to each file (a list: counted as appended)
        self.failed = False  # a write failed (a full disk): no file is taken as complete
        self.waiting: dict[int, list[str]] = {}  # rows of members past MAX_OPEN_FILES, not yet appended
        self.last_write = time.monotonic()

    def __call__(self, table, members) -> None:
        if not self.any_directory:
            return
        try:
            self.append(table, members)
        except BaseException:
            self.failed = True
            raise

    def complete(self, recorded: np.ndarray) -> np.ndarray:
        """Which members' files hold exactly their histories' rows (`recorded`: (epochs, P), as
        gdlab.epoch_table.EpochTable.final_recorded)."""
        counts = recorded.sum(axis=0) if len(recorded) else np.zeros(len(self.rows), dtype=np.int64)
        return self.has_directory & (np.array(self.rows) == counts) & (counts > 0) & (not self.failed)

    def append(self, table, members) -> None:
        block = table.blocks[-1]
        for p in members.tolist():
            file = self.files.get(p)
            if file is not None:  # the common case: an open file, appended and flushed
                file.write(table.format_row(block, p) + "\n")
                file.flush()
            elif self.directories[p] is not None:
                self.append_unopened(p, table.format_row(block, p) + "\n", table.names)
            else:
                continue
            self.rows[p] += 1
        if self.waiting and time.monotonic() - self.last_write >= WAIT_SECONDS:
            self.write_waiting()

    def append_unopened(self, p: int, line: str, names: list[str]) -> None:
        """Member p's first row (the file made, kept open up to MAX_OPEN_FILES), or a row of a member past
        MAX_OPEN_FILES (appended once a second, `write_waiting`)."""
        if p in self.started:
            self.waiting.setdefault(p, []).append(line)
            return
        directory = self.directories[p]
        directory.mkdir(parents=True, exist_ok=True)
        file = open(directory / "history.csv", "w", newline="")  # noqa: SIM115 (closed in close)
        file.write(",".join(names) + "\n" + line)
        file.flush()
        self.started.add(p)
        if len(self.files) < MAX_OPEN_FILES:
            self.files[p] = file
        else:
            file.close()

    def write_waiting(self) -> None:
        """Append the rows waiting for members without an open file: one open, write and close each."""
        self.last_write = time.monotonic()
        waiting, self.waiting = self.waiting, {}
        for p, lines in waiting.items():
            with open(self.directories[p] / "history.csv", "a", newline="") as appended:
                appended.write("".join(lines))

    def close(self) -> None:
        try:
            self.write_waiting()
        except OSError:  # a full disk: no file is taken as complete; write_history says what failed
            self.failed = True
        for file in self.files.values():
            try:
                file.close()
            except OSError:  # a full disk: what was flushed stays; write_history says what failed
                pass
        self.files = {}


def write_history(directory: Path, history: pd.DataFrame) -> Path:
    """history.csv whole, through a new file renamed over the appended one: if the write fails (a full disk),
    the appended copy is left as it was."""
    directory.mkdir(parents=True, exist_ok=True)
    return replace_atomically(directory / "history.csv", lambda path: history.to_csv(path, index=False))


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(new)` to a new file beside `path`, then rename it over `path`; on any failure the new file is
    removed and `path` is untouched."""
    new = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        write(new)
        os.replace(new, path)
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    return path


def write_run_outputs(
    directory: Path,
    config_yaml: str,
    name: str,
    overrides: list[str],
    history: pd.DataFrame | None,
    model: MLP,
    data: Dataset,
    plots: bool = True,
) -> list[Path]:
    """Config (as YAML, passwords already masked by the caller), overrides, plots (titled `name`; `history`
    for the curves) and weights, next to the history.csv written first (`HistoryFiles`, `write_history`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(config_yaml)
    (directory / "overrides.txt").write_text("\n".join(overrides) + "\n")
    paths = [directory / "config.yaml", directory / "overrides.txt", directory / "history.csv"]
    weights = io.BytesIO()  # torch.save to a full disk raises a RuntimeError; a file write, an OSError
    torch.save(model.state_dict(), weights)
    (directory / "weights.pt").write_bytes(weights.getvalue())
    paths.append(directory / "weights.pt")
    if not plots:
        return paths
    if history is not None and len(history):
        paths.append(plot_curves(history, directory / "curves.png", title=name))
    if data.n_features == 2:
        paths.append(plot_decision_boundary(model, data, directory / "decision_boundary.png"))
    elif data.test is not None or data.n_classes > 2:
        paths.append(plot_confusion_matrix(model, data, directory / "confusion_matrix.png"))
    return paths


def plot_curves(history: pd.DataFrame, path: Path, title: str = "") -> Path:
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val", "test"):
        if f"{split}/loss" in history:
            ax_loss.plot(history["epoch"], history[f"{split}/loss"], label=split)
            ax_acc.plot(history["epoch"], history[f"{split}/acc"], label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.05), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.84, wspace=0.25)  # tight_layout: 0.1 s
    fig.savefig(path, dpi=80)
    return path


@torch.no_grad()
def plot_decision_boundary(model: MLP, data: Dataset, path: Path) -> Path:
    X = data.train.X.cpu().double().numpy()
    (x0, x1), (y0, y1) = (
        (X[:, 0].min() - 0.5, X[:, 0].max() + 0.5),
        (X[:, 1].min() - 0.5, X[:, 1].max() + 0.5),
    )
    xx, yy = np.meshgrid(np.linspace(x0, x1, 150), np.linspace(y0, y1, 150))
    grid = torch.as_tensor(np.c_[xx.ravel(), yy.ravel()], dtype=data.train.X.dtype)
    proba = model.cpu().predict_proba(grid)
    p1 = (proba[:, 0] if model.head == "sigmoid" else proba[:, 1]).reshape(xx.shape).numpy()
    wrong = misclassified(model, data.train)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    contour = ax.contourf(xx, yy, p1, levels=11, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
    ax.contour(xx, yy, p1, levels=[0.5], colors="k", linewidths=1)
    labels = np.asarray(data.train.y)
    for label, color in ((0, "#2166ac"), (1, "#b2182b")):  # the classes in the colour bar's end colours
        right = (labels == label) & ~wrong
        ax.scatter(X[right, 0], X[right, 1], c=color, edgecolors="white", linewidths=0.4, s=14,
                   label=f"class {label}")  # fmt: skip
    ax.scatter(X[wrong, 0], X[wrong, 1], marker="X", c="#ffd700", edgecolors="k", linewidths=0.8, s=60,
               label=f"misclassified ({int(wrong.sum())})")  # fmt: skip
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.colorbar(contour, ax=ax, label="P(class 1)")
    ax.set_title(
        f"decision boundary, {data.name}: {int(wrong.sum())} of {len(X)} train points wrong", fontsize=10
    )
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.08, top=0.92)
    fig.savefig(path, dpi=80)
    return path


@torch.no_grad()
def misclassified(model: MLP, split) -> np.ndarray:
    """Which points of a split the model classifies wrongly (the decision boundary marks them)."""
    Z = model.cpu()(split.X)
    predicted = (Z[:, 0] > 0).long() if model.head == "sigmoid" else Z.argmax(dim=1)
    return predicted.numpy() != np.asarray(split.y)


@torch.no_grad()
def plot_confusion_matrix(model: MLP, data: Dataset, path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    split = data.test if data.test is not None else data.train
    Z = model.cpu()(split.X)
    predicted = (Z[:, 0] > 0).long() if model.head == "sigmoid" else Z.argmax(dim=1)
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(split.y, predicted.numpy(), ax=ax, colorbar=False)
    ax.set(title=f"confusion matrix ({data.name}, {'test' if data.test is not None else 'train'})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path
