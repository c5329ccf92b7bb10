"""gdlab's time per epoch against bare loops on the lab workloads, all measured in this one process.

For each workload, seconds per epoch of (a) a bare PyTorch loop like lab 001's, (b) a numpy loop like
lab 002's, (c) gdlab-train with tracking=none, (d) with tracking=local, (e) with backprop=manual; and, on
the moons lab, the Armijo rules: evaluations per step and time per step against a fixed-LR GD step.
Every ratio is against (a) (or GD) from the same invocation, best of --repeats, interleaved.
Usage: python benchmarks/bench_overhead.py [--workloads xor,moons,digits] [--epochs 1000] [--repeats 3]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

import gdlab
from gdlab.compose import compose_config
from gdlab.config import validate
from gdlab.fit import build
from gdlab.model import compute_loss

WORKLOADS = {
    "xor": ["dataset=xor", "dataset.repeats=500", "model.depth=2", "model.width=8", "model.head=softmax",
            "init=he", "optimizer=gd", "optimizer.lr=0.1", "seed=2"],
    "moons": ["+experiment=lab_moons_fixed_lr"],
    "digits": ["dataset=digits", "model.depth=3", "model.width=64", "optimizer=gd", "optimizer.lr=0.1"],
}  # fmt: skip
OVERRIDES = [*WORKLOADS["xor"], "trainer.accelerator=cpu"]  # bench_tracking's workload
ARMIJO_LAB = ["optimizer=backtracking", "optimizer.lr=1.0"]  # every step starts at 1.0, forward-only trials
ARMIJO_RULES = {
    "GD lr 1.0 (reference)": ["optimizer=gd", "optimizer.lr=1.0"],
    "Armijo reset=initial (lab 003)": ARMIJO_LAB,
    "Armijo reset=previous": [*ARMIJO_LAB, "optimizer.reset=previous"],
    "Armijo reset=grow x2": [*ARMIJO_LAB, "optimizer.reset=grow", "optimizer.growth=2.0"],
    "Armijo reuse, reset=grow x1.1": [*ARMIJO_LAB, "optimizer.trial_eval=forward_backward",
                                      "optimizer.reset=grow", "optimizer.growth=1.1"],
}  # fmt: skip
ARMIJO_REUSE = ARMIJO_RULES["Armijo reuse, reset=grow x1.1"]


def bare_pytorch(workload: list[str], epochs: int) -> float:
    """Lab 001's loop: forward, loss, backward, W -= lr * dW, zero the grads. Seconds per epoch."""
    cfg = validate(compose_config([*workload, "tracking=none"]))
    data, model = build(cfg)
    X, T, lr = data.train.X, data.train.T, cfg.optimizer.lr
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[cfg.model.activation]
    layers, params = model.layers, list(model.parameters())
    start = time.perf_counter()
    for _ in range(epochs):
        A = X
        for W, b in layers[:-1]:
            A = act(A @ W + b)
        Z = A @ layers[-1][0] + layers[-1][1]
        loss = compute_loss(Z, T, cfg.model.head, cfg.loss)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad.zero_()
        loss.item()  # the lab records the loss every epoch
    return (time.perf_counter() - start) / epochs


def bare_numpy(workload: list[str], epochs: int) -> float:
    """Lab 002's loop: numpy forward, dZ = (y_hat - Y) / N, layer-by-layer backward (ReLU nets)."""
    cfg = validate(compose_config([*workload, "tracking=none"]))
    data, model = build(cfg)
    X, Y = data.train.X.numpy(), data.train.T.numpy()
    Ws = [W.detach().numpy().copy() for W, _ in model.layers]
    bs = [b.detach().numpy().copy() for _, b in model.layers]
    lr, n, softmax = cfg.optimizer.lr, len(X), cfg.model.head == "softmax"
    start = time.perf_counter()
    for _ in range(epochs):
        As, Zs = [X], []
        for W, b in zip(Ws, bs, strict=True):
            Zs.append(As[-1] @ W + b)
            As.append(np.maximum(Zs[-1], 0))
        Z = Zs[-1]
        if softmax:
            E = np.exp(Z - Z.max(axis=1, keepdims=True))
            Y_hat = E / E.sum(axis=1, keepdims=True)
            loss = -np.mean(np.sum(Y * np.log(Y_hat + 1e-12), axis=1))
        else:
            Y_hat = 1 / (1 + np.exp(-Z))
            loss = -np.mean(Y * np.log(Y_hat + 1e-12) + (1 - Y) * np.log(1 - Y_hat + 1e-12))
        dZ = (Y_hat - Y) / n
        for l in range(len(Ws) - 1, -1, -1):
            dW, db = As[l].T @ dZ, dZ.sum(axis=0)
            if l > 0:
                dZ = (dZ @ Ws[l].T) * (Zs[l - 1] > 0)
            Ws[l] -= lr * dW
            bs[l] -= lr * db
        float(loss)
    return (time.perf_counter() - start) / epochs


def gdlab_train(workload: list[str], epochs: int, *extra: str) -> float:
    """Steady-state seconds per epoch (Trainer start-up, ~0.1 s per run, is left out)."""
    result = gdlab.run([*workload, f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu", "tracking=none",
                        *extra])  # fmt: skip
    times = result.history["time"]
    return (times.iloc[-1] - times.iloc[0]) / (len(times) - 1)


def best_of(cases: dict, repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            best[name] = min(best[name], case())
    return best


def workload_table(name: str, epochs: int, repeats: int, store: str) -> dict[str, float]:
    workload = WORKLOADS[name]
    cases = {
        "(a) bare PyTorch loop": lambda: bare_pytorch(workload, epochs),
        "(b) numpy loop": lambda: bare_numpy(workload, epochs),
        "(c) gdlab-train, tracking=none": lambda: gdlab_train(workload, epochs),
        "(d) gdlab-train, tracking=local": lambda: gdlab_train(
            workload, epochs, "tracking=local", f"tracking.dir={store}", "tracking.plots=false"
        ),
        "(e) gdlab-train, backprop=manual": lambda: gdlab_train(workload, epochs, "backprop=manual"),
    }
    return best_of(cases, repeats)


def armijo_table(epochs: int, repeats: int) -> dict[str, dict]:
    rows = {}
    for name, extra in ARMIJO_RULES.items():
        result = gdlab.run([*WORKLOADS["moons"], f"trainer.max_epochs={epochs}", "tracking=none", *extra])
        rows[name] = {"evals_per_step": result.final["evals"] / result.final["epochs"],
                      "final_loss": result.final["train/loss"]}  # fmt: skip
    timings = best_of({name: (lambda e=extra: gdlab_train(WORKLOADS["moons"], epochs, *e))
                       for name, extra in ARMIJO_RULES.items()}, repeats)  # fmt: skip
    for name, seconds in timings.items():
        rows[name]["ms_per_step"] = seconds * 1e3
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="xor,moons,digits")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gdlab_train(WORKLOADS["xor"], 50)  # warm-up: imports, Lightning's first fit
    results: dict = {"epochs": args.epochs, "workloads": {}}
    with tempfile.TemporaryDirectory() as store:
        for name in args.workloads.split(","):
            best = workload_table(name, args.epochs, args.repeats, store)
            baseline = best["(a) bare PyTorch loop"]
            print(f"\n{name}: ms per epoch, ratio to (a)")
            for case, seconds in best.items():
                print(f"  {case:36s} {seconds * 1e3:8.3f} {seconds / baseline:6.2f}x")
            results["workloads"][name] = {case: seconds * 1e3 for case, seconds in best.items()}
    armijo = armijo_table(300, args.repeats)
    gd = armijo["GD lr 1.0 (reference)"]["ms_per_step"]
    print(
        "\nmoons lab, 300 steps, float64: evaluations per step, ms per step, ratio to a GD step, final loss"
    )
    for name, row in armijo.items():
        print(f"  {name:36s} {row['evals_per_step']:5.2f} {row['ms_per_step']:8.3f} "
              f"{row['ms_per_step'] / gd:6.2f}x {row['final_loss']:.4f}")  # fmt: skip
    results["armijo_moons"] = armijo
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
