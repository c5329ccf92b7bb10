"""Population mode at scale: the whole `gdlab.run(population=P)` against a bare batched loop, in one process.

The workload is the moons lab net (2-16-1 ReLU, sigmoid head, bce, 400 training and 100 test rows,
float64), full-batch GD, each member with its own lr drawn log-uniform over [1e-3, 10] with a fixed seed.
  (bare)  a bare batched loop: `baddbmm` forward, autograd backward, a per-member-lr GD step, the test
          split evaluated, the epoch's train/test loss and accuracy kept as (P,) tensors;
  (train) gdlab's training alone (trainer.fit: final["wall_time"]);
  (whole) the whole `gdlab.run(["+experiment=lab_moons_fixed_lr", ...], population=[...])` call:
          compose, validate, build, train, record (histories, final metrics, RunResults);
  (outside) what one more member costs outside training: the slope of (whole - train) between two sizes;
  (tracked) with --tracked P, the same population with tracking=local (an existing SQLite store, no PNGs:
          tracking.plots=false, as the shipped sweeps set it), against (whole).
Both train on --threads torch threads (gdlab's trainer.threads, 1 by default). Seconds are best of
--repeats, interleaved. Targets: (whole) <= 1.5x (bare) at P >= 256, <= 2x at P = 64;
(outside) <= 1 ms a member; (tracked) <= 1.25x (whole) at P = 1024.
Usage: python benchmarks/bench_population.py [--sizes 64,256,1024,4096] [--epochs 300] [--repeats 2]
       [--tracked 1024] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gdlab
from gdlab.compose import compose_config
from gdlab.config import validate
from gdlab.fit import load_data, torch_threads

BASE = ["+experiment=lab_moons_fixed_lr", "tracking=none"]
TARGETS = {64: 2.0}  # whole / bare; 1.5 elsewhere
TARGET, OUTSIDE_MS, TRACKED = 1.5, 1.0, 1.25


def learning_rates(members: int) -> list[float]:
    rng = random.Random(42)
    return [math.exp(rng.uniform(math.log(1e-3), math.log(10.0))) for _ in range(members)]


def bare_loop(members: int, epochs: int, threads: int | None) -> float:
    """Seconds for `epochs` of the bare batched loop (see the module's docstring), on as many torch threads
    as gdlab trains with (trainer.threads)."""
    with torch_threads(threads):
        return bare_epochs(members, epochs)


def bare_epochs(members: int, epochs: int) -> float:
    cfg = validate(compose_config(BASE))
    data = load_data(cfg)
    X, T, Xt, Tt = data.train.X, data.train.T, data.test.X, data.test.T
    dtype = X.dtype
    generator = torch.Generator().manual_seed(0)
    W1 = (torch.randn(members, 2, 16, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    b1 = torch.zeros(members, 1, 16, dtype=dtype, requires_grad=True)
    W2 = (torch.randn(members, 16, 1, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    b2 = torch.zeros(members, 1, 1, dtype=dtype, requires_grad=True)
    params = [W1, b1, W2, b2]
    lr = torch.tensor(learning_rates(members), dtype=dtype).view(members, 1, 1)

    def forward(A):
        A = A.expand(members, *A.shape)
        return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, A, W1)), W2)

    def measure(Z, T_):
        loss = F.binary_cross_entropy_with_logits(Z, T_.expand_as(Z), reduction="none").mean(dim=(1, 2))
        acc = ((Z > 0).to(dtype) == T_).to(dtype).mean(dim=(1, 2))
        return loss, acc

    metrics = []
    started = time.perf_counter()
    for _ in range(epochs):
        loss, acc = measure(forward(X), T)
        loss.sum().backward()
        with torch.no_grad():
            for p in params:
                p.sub_(lr * p.grad)
                p.grad = None
            test_loss, test_acc = measure(forward(Xt), Tt)
        metrics.append(torch.stack([loss.detach(), acc, test_loss, test_acc]))
    torch.stack(metrics).tolist()  # the numbers reach the host once, at the end
    return time.perf_counter() - started


def whole_run(
    members: int, epochs: int, threads: int | None, tracking: str = "none", folder: Path | None = None
):
    """(seconds of the whole gdlab.run call, seconds of its training)."""
    base = [
        *BASE,
        f"trainer.max_epochs={epochs}",
        f"trainer.threads={'null' if threads is None else threads}",
    ]
    if tracking != "none":
        base += [f"tracking={tracking}", f"tracking.dir={folder}", "tracking.plots=false"]
    population = [{"optimizer.lr": lr} for lr in learning_rates(members)]
    started = time.perf_counter()
    results = gdlab.run(base, population=population)
    return time.perf_counter() - started, results[0].final["wall_time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024,4096")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tracked", type=int, nargs="?", const=1024, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (gdlab's default: 1)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    whole_run(4, 2, args.threads)  # imports and first-call costs outside the timings
    results = {}
    print(f"moons 2-16-1, GD, {args.epochs} epochs, untracked, {args.threads} torch thread(s) for both; "
          f"best of {args.repeats}; ms per epoch")  # fmt: skip
    print("| P | bare | gdlab training | whole gdlab.run | whole / bare | target | outside training |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for members in sizes:
        bare, whole, train = math.inf, math.inf, math.inf
        for _ in range(args.repeats):
            bare = min(bare, bare_loop(members, args.epochs, args.threads))
            w, t = whole_run(members, args.epochs, args.threads)
            whole, train = min(whole, w), min(train, t)
        target, ratio = TARGETS.get(members, TARGET), whole / bare
        results[members] = dict(bare=bare, train=train, whole=whole, ratio=ratio, target=target)
        per_epoch = lambda s: f"{s / args.epochs * 1000:.2f}"  # noqa: E731
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"| {members} | {per_epoch(bare)} | {per_epoch(train)} ({train / bare:.2f}x) | "
              f"{per_epoch(whole)} | {ratio:.2f}x | {verdict} <= {target}x | {whole - train:.2f} s |",
              flush=True)  # fmt: skip
    print_marginal(results, sizes)
    if args.tracked:
        members, tracked, untracked = args.tracked, math.inf, math.inf
        with tempfile.TemporaryDirectory() as folder:
            # the store exists, as after a user's first run (making a new SQLite store costs ~6 s, once)
            whole_run(4, 2, args.threads, "local", Path(folder))
            for _ in range(args.repeats):
                seconds, _ = whole_run(members, args.epochs, args.threads, "local", Path(folder))
                tracked = min(tracked, seconds)
                untracked = min(untracked, whole_run(members, args.epochs, args.threads)[0])
        ratio = tracked / untracked
        results["tracked"] = dict(members=members, tracked=tracked, untracked=untracked, ratio=ratio)
        print(f"tracked against untracked, P = {members}: {tracked:.2f} s / {untracked:.2f} s = {ratio:.2f}x "
              f"({'ok' if ratio <= TRACKED else 'MISSED'} <= {TRACKED}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=1))
    if args.plot:
        plot(results, sizes, args.epochs, args.plot)


def print_marginal(results: dict, sizes: list[int]) -> None:
    """What one more member costs outside training: the slope of (whole - train) between two sizes (the
    fixed costs, compose and Lightning's start, cancel out)."""
    for small, large in zip(sizes[:-1], sizes[1:], strict=True):
        outside = {p: results[p]["whole"] - results[p]["train"] for p in (small, large)}
        per_member_ms = (outside[large] - outside[small]) / (large - small) * 1000
        results[f"outside_ms_per_member_{small}_{large}"] = per_member_ms
        verdict = "ok" if per_member_ms <= OUTSIDE_MS else "MISSED"
        print(f"outside training, per member (P {small} -> {large}): {per_member_ms:.3f} ms "
              f"({verdict} <= {OUTSIDE_MS} ms)")  # fmt: skip


def plot(results: dict, sizes: list[int], epochs: int, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4))
    ax = figure.subplots()
    for key, label in (
        ("bare", "bare batched loop"),
        ("train", "gdlab training"),
        ("whole", "whole gdlab.run"),
    ):
        ax.plot(sizes, [results[p][key] / epochs * 1000 for p in sizes], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="members P", ylabel="ms per epoch",
           title=f"moons 2-16-1, GD, {epochs} epochs, untracked")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
