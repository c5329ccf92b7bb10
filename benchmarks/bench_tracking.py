"""What MLflow tracking adds to a training run: tracking=local against tracking=none, same process.

Workload: lab 002's XOR x500 network, 5000 epochs (default). Prints the wall time of each and the
overhead in percent (target: <= 10%). Usage: python benchmarks/bench_tracking.py [--epochs N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import gdlab
from bench_overhead import OVERRIDES  # the same XOR workload (this folder is on sys.path)


def timed_run(epochs: int, tracking: str, store: str) -> tuple[float, float]:
    """(training loop seconds, whole gdlab.run seconds: + draining the metrics, plots, artifacts)."""
    started = time.perf_counter()
    result = gdlab.run([*OVERRIDES, f"trainer.max_epochs={epochs}", f"tracking={tracking}",
                        f"tracking.dir={store}", "tracking.experiment=bench"])  # fmt: skip
    total = time.perf_counter() - started
    if tracking != "none":
        assert result.final["tracking_outage"] is None, result.final["tracking_outage"]
    return result.final["wall_time"], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as store:
        timed_run(50, "local", store)  # warm-up: imports, store creation, Lightning's first fit
        runs = {"none": [], "local": []}
        for _ in range(args.repeats):
            for tracking, times in runs.items():
                times.append(timed_run(args.epochs, tracking, store))
    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in runs.items()}
    loop_overhead = best["local"][0] / best["none"][0] - 1
    total_overhead = best["local"][1] / best["none"][1] - 1
    print(f"{args.epochs}-epoch XOR run, best of {args.repeats}    training loop    whole gdlab.run")
    for tracking, (loop, total) in best.items():
        print(f"tracking={tracking:6s}                 {loop:8.3f} s       {total:8.3f} s")
    print(
        f"overhead                        {loop_overhead * 100:+7.1f}%        {total_overhead * 100:+7.1f}%"
        "   (target <= 10%)"
    )
    print("(whole run = training + waiting for the metric writer + plots and artifacts)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": args.epochs, "seconds": best, "loop_overhead": loop_overhead,
                       "total_overhead": total_overhead}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
