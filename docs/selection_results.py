"""The README's selection results: what choosing on the test split reported, against the refit's test split.

For each sweep and each sampler seed s, two gdlab-sweep commands in a fresh directory (untracked):
  old  gdlab-sweep NAME objective=test/M dataset.val_size=0 ++gdlab_sweep.select_on_test=true  (the way
       every shipped sweep worked before the validation split: rank the trials on the test split, report
       the best trial's own test metric)
  new  gdlab-sweep NAME  (as shipped: rank on val/M with dataset.val_size=0.2, refit the winner on the
       train + val rows, measure the test split once)
Both with hydra.sweeper.sampler.seed=s; the final models of both ways train on the same 400 (moons) or
1437 (digits) rows. Printed as Markdown: per seed, the chosen values and both test numbers; then the
median over seeds of each, and of the difference (the old way's optimism).
Usage: python docs/selection_results.py [--sweeps lr,digits_depth_width] [--seeds 0,1,2,3,4] [--budget N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna

METRIC = {"lr": "loss", "lr_depth": "loss", "digits_depth_width": "acc"}
# The population each sweep was shipped with when the README's results were measured (before 2026-12-03
# lr asked its 64 trials as one batch and lr_depth went trial by trial): pinned, so they reproduce.
MEASURED_POPULATION = {"lr": 64, "lr_depth": 1, "digits_depth_width": 1}
SCRUBBED_ENV = ["MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE", "GDLAB_MLFLOW_PARENT_RUN_ID"]


def gdlab_sweep(*args: str, cwd: Path) -> str:
    executable = str(Path(sys.executable).with_name("gdlab-sweep"))
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    done = subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"gdlab-sweep {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def result_of(stdout: str, metric: str) -> float:
    """The sweep's reported test metric: its last line, `gdlab-sweep: result: test/loss=... test/acc=...`."""
    match = re.search(rf"^gdlab-sweep: result: .*?test/{metric}=([-0-9.e+]+)", stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no result line in:\n{stdout[-1500:]}")
    return float(match.group(1))


def chosen(cwd: Path, study: str) -> dict:
    best = optuna.load_study(study_name=study, storage=f"sqlite:///{cwd}/mlruns/optuna.db").best_trial
    return {key.rsplit(".", 1)[-1]: value for key, value in best.params.items()}


def run_seed(sweep: str, seed: int, budget: int | None, cwd: Path) -> dict:
    metric = METRIC[sweep]
    common = [f"hydra.sweeper.sampler.seed={seed}", "tracking=none", "--progress", "0",
              "--population", str(MEASURED_POPULATION[sweep])]  # fmt: skip
    common += ["--budget", str(budget)] if budget else []
    on_test = [f"objective=test/{metric}", "dataset.val_size=0", "++gdlab_sweep.select_on_test=true"]
    old = gdlab_sweep(sweep, *on_test, *common, "--study", f"old-{sweep}-{seed}", cwd=cwd)
    new = gdlab_sweep(sweep, *common, "--study", f"new-{sweep}-{seed}", cwd=cwd)
    return {"sweep": sweep, "seed": seed, "metric": metric,
            "old": result_of(old, metric), "old_params": chosen(cwd, f"old-{sweep}-{seed}"),
            "new": result_of(new, metric), "new_params": chosen(cwd, f"new-{sweep}-{seed}")}  # fmt: skip


def short(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def table(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    lines = [f"| seed | chosen on test | its test {metric} (reported the old way) | chosen on val | "
             f"refit's test {metric} (measured once) |", "| ---: | --- | ---: | --- | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['seed']} | {short(r['old_params'])} | {r['old']:.4g} | "
                     f"{short(r['new_params'])} | {r['new']:.4g} |")  # fmt: skip
    old, new = [r["old"] for r in rows], [r["new"] for r in rows]
    gap = [o - n for o, n in zip(old, new, strict=True)]
    lines.append(f"| median | | {statistics.median(old):.4g} | | {statistics.median(new):.4g} |")
    optimistic = sum((g < 0) if metric == "loss" else (g > 0) for g in gap)
    lines.append(f"\nold minus new, median {statistics.median(gap):+.4g} (range {min(gap):+.4g} to "
                 f"{max(gap):+.4g}); the old way looked better in {optimistic} of {len(rows)} "
                 "seeds")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selection_results.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="lr,digits_depth_width")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budget", type=int, help="trials per sweep (default: the sweep file's)")
    args = parser.parse_args(argv)
    sweeps = [s for s in args.sweeps.split(",") if s]
    unknown = [s for s in sweeps if s not in METRIC]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        seeds = []
    if unknown or not seeds or not sweeps:
        parser.error(f"--sweeps from {','.join(METRIC)}; --seeds as integers like 0,1,2")
    for sweep in sweeps:
        with tempfile.TemporaryDirectory(prefix=f"gdlab-selection-{sweep}-") as folder:
            rows = [run_seed(sweep, seed, args.budget, Path(folder)) for seed in seeds]
        print(f"\n{sweep} ({len(seeds)} sampler seeds)\n")
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
