"""gdlab-train's time per epoch (tracking off) against a bare PyTorch loop on the same workload.

Workload: lab 002's XOR tiled x500, [2, 8, 8, 2] ReLU, softmax + cross-entropy, He init, GD lr 0.1,
float64, CPU. Both run in this process, interleaved, best of `--repeats`; the ratio is what counts.
Usage: python benchmarks/bench_overhead.py [--epochs 2000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import gdlab
from gdlab.config import validate
from gdlab.train import build, compose_config

OVERRIDES = [
    "dataset=xor", "dataset.repeats=500", "model.depth=2", "model.width=8", "model.head=softmax",
    "init=he", "optimizer=gd", "optimizer.lr=0.1", "trainer.accelerator=cpu", "seed=2",
]  # fmt: skip


ARMIJO_LAB = ["optimizer=backtracking", "optimizer.lr=1.0"]  # every step starts at 1.0, forward-only trials
ARMIJO_REUSE = [
    *ARMIJO_LAB,
    "optimizer.trial_eval=forward_backward",
    "optimizer.reset=grow",
    "optimizer.growth=1.1",
]


def bare_pytorch(epochs: int) -> float:
    """Lab 001's loop: forward, loss, backward, W -= lr * dW, zero the grads. Seconds per epoch."""
    cfg = validate(compose_config(OVERRIDES))
    data, model = build(cfg)
    X, T = data.train.X, data.train.T
    params = list(model.parameters())
    start = time.perf_counter()
    for _ in range(epochs):
        (W1, b1), (W2, b2), (W3, b3) = model.layers
        Z = torch.relu(torch.relu(X @ W1 + b1) @ W2 + b2) @ W3 + b3
        loss = -(T * F.log_softmax(Z, dim=1)).sum(dim=1).mean()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad.zero_()
        loss.item()  # the lab records the loss every epoch
    return (time.perf_counter() - start) / epochs


def gdlab_train(epochs: int, *extra: str) -> float:
    """Steady-state seconds per epoch (Trainer start-up, ~0.1 s per run, is left out)."""
    result = gdlab.run([*OVERRIDES, f"trainer.max_epochs={epochs}", "tracking=none", *extra])
    times = result.history["time"]
    return (times.iloc[-1] - times.iloc[0]) / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cases = {
        "bare pytorch": lambda: bare_pytorch(args.epochs),
        "gdlab-train (autograd)": lambda: gdlab_train(args.epochs),
        "gdlab-train (backprop=manual)": lambda: gdlab_train(args.epochs, "backprop=manual"),
        "gdlab-train Armijo (lab 003 rule)": lambda: gdlab_train(args.epochs, *ARMIJO_LAB),
        "gdlab-train Armijo (reuse, grow 1.1)": lambda: gdlab_train(args.epochs, *ARMIJO_REUSE),
    }
    gdlab_train(50)  # warm-up: imports, Lightning's first fit
    print("(Armijo rows: per epoch = per step; compare them with the gdlab-train (autograd) GD row)")
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            best[name] = min(best[name], case())
    baseline = best["bare pytorch"]
    print(f"{'case':38s} {'ms/epoch':>9s} {'ratio':>7s}")
    for name, seconds in best.items():
        print(f"{name:38s} {seconds * 1e3:9.3f} {seconds / baseline:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"epochs": args.epochs, "ms_per_epoch": {k: v * 1e3 for k, v in best.items()}},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
