"""Make the README's figures under docs/ from the lab presets and the sweeps' Optuna study database.

Usage (from the repository root, after `gdlab-sweep init_activation`, `seeds` and `lr_depth` ran in DIR):
    .venv/bin/python docs/make_figures.py --sweeps-dir DIR
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import optuna
import torch
from matplotlib.figure import Figure

import gdlab

DOCS = Path(__file__).resolve().parent


def xor_curves() -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for preset, label in [("lab_xor_tiny_init", "lab 000: tiny init (randn*0.01), stuck at ln 2"),
                          ("lab_xor_sigmoid_3layer", "lab 001: 2-4-4-1 sigmoid, randn init"),
                          ("lab_xor_relu_he_softmax", "lab 002: [2,8,8,2] ReLU, He, softmax")]:  # fmt: skip
        h = gdlab.run([f"+experiment={preset}", "tracking=none"]).history
        ax.plot(h["epoch"], h["train/loss"], label=label)
    ax.axhline(math.log(2), color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="The XOR labs, reproduced")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)
    fig.savefig(DOCS / "xor_loss_curves.png", dpi=90)


@torch.no_grad()
def moons_boundaries() -> None:
    fig = Figure(figsize=(10, 4.3))
    axes = fig.subplots(1, 2)
    for ax, (preset, title) in zip(axes, [("lab_moons_fixed_lr", "fixed GD, lr 0.1"),
                                          ("lab_moons_backtracking", "Armijo backtracking from 1.0")],
                                   strict=True):  # fmt: skip
        r = gdlab.run([f"+experiment={preset}", "tracking=none"])
        X = r.data.train.X.numpy()
        xx, yy = np.meshgrid(np.linspace(X[:, 0].min() - 0.5, X[:, 0].max() + 0.5, 150),
                             np.linspace(X[:, 1].min() - 0.5, X[:, 1].max() + 0.5, 150))  # fmt: skip
        grid = torch.as_tensor(np.c_[xx.ravel(), yy.ravel()], dtype=r.data.train.X.dtype)
        p = r.model.predict_proba(grid)[:, 0].reshape(xx.shape).numpy()
        ax.contourf(xx, yy, p, levels=11, cmap="RdBu_r", alpha=0.7, vmin=0, vmax=1)
        ax.contour(xx, yy, p, levels=[0.5], colors="k", linewidths=1)
        ax.scatter(X[:, 0], X[:, 1], c=r.data.train.y, cmap="RdBu_r", edgecolors="k", s=10)
        ax.set(title=f"{title}: test acc {r.final['test/acc']:.2f}")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.9, wspace=0.15)
    fig.savefig(DOCS / "moons_boundaries.png", dpi=90)


def lr_depth_picture(storage: str) -> None:
    study = optuna.load_study(study_name="lr_depth", storage=storage)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for depth in sorted({t.params["model.depth"] for t in study.trials}):
        done = [t for t in study.trials if t.params["model.depth"] == depth and t.state.name == "COMPLETE"]
        ax.scatter([t.params["optimizer.lr"] for t in done], [t.value for t in done], label=f"depth {depth}")
    ax.set(xscale="log", xlabel="learning rate (fixed-LR GD)", ylabel="final validation loss (300 epochs)",
           title="lr_depth sweep on two-moons (completed trials)")  # fmt: skip
    ax.legend()
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91)
    fig.savefig(DOCS / "lr_depth.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps-dir", type=Path, required=True, help="where the gdlab-sweep runs were made")
    args = parser.parse_args()
    xor_curves()
    moons_boundaries()
    lr_depth_picture(f"sqlite:///{args.sweeps_dir.resolve() / 'mlruns' / 'optuna.db'}")


if __name__ == "__main__":
    main()
