"""The README's cross-validation results: the `lr` sweep ranked on one seed and one split, against the same
64 learning rates ranked on 5 folds x 2 seeds.

For each sampler seed s, two gdlab-sweep commands in a fresh directory (untracked), with
hydra.sweeper.sampler.seed=s: both ask their 64 trials as one population before any finished, so both
draw the same 64 learning rates, trial by trial.
  single  gdlab-sweep lr --population 64  (one seed, ranked on a 20% validation split)
  cv      gdlab-sweep lr ++gdlab_sweep.cv_folds=5 --replicates 2  (ranked on the mean over 10 members)
Each refits its winner on the 400 non-test rows and measures the 100 test rows once. Printed as Markdown:
per seed, each way's chosen lr, the cv way's 95% interval for its winner, both refits' test loss, and where
the cv ranking puts the single-seed winner; then how often that is outside the cv top 5.
Usage: python docs/cv_results.py [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
from selection_results import gdlab_sweep  # docs/, beside this script

CV = ["++gdlab_sweep.cv_folds=5", "--replicates", "2"]


def test_loss(stdout: str) -> float:
    match = re.search(r"^gdlab-sweep: result: test/loss=([-0-9.e+]+)", stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no result line in:\n{stdout[-1500:]}")
    return float(match.group(1))


def ranking(cwd: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{cwd}/mlruns/optuna.db").trials
    return sorted((t for t in trials if t.value is not None), key=lambda t: t.value)


def run_seed(seed: int, cwd: Path) -> dict:
    # one batch of 64: both ways draw the same 64 learning rates (the shipped default was 64 when measured)
    common = [f"hydra.sweeper.sampler.seed={seed}", "tracking=none", "--progress", "0", "--population", "64"]
    single = gdlab_sweep("lr", *common, "--study", f"single-{seed}", cwd=cwd)
    cv = gdlab_sweep("lr", *common, *CV, "--study", f"cv-{seed}", cwd=cwd)
    single_rank, cv_rank = ranking(cwd, f"single-{seed}"), ranking(cwd, f"cv-{seed}")
    lr = lambda trial: trial.params["optimizer.lr"]  # noqa: E731
    assert sorted(map(lr, single_rank)) == sorted(map(lr, cv_rank)), "the two ways drew different trials"
    position = {lr(t): i + 1 for i, t in enumerate(cv_rank)}
    winner = cv_rank[0].user_attrs["members"]
    return {"seed": seed, "single_lr": lr(single_rank[0]), "single_test": test_loss(single),
            "cv_lr": lr(cv_rank[0]), "cv_interval": winner["ci95"], "cv_test": test_loss(cv),
            "single_in_cv": position[lr(single_rank[0])]}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| sampler seed | single: chosen lr | its refit's test loss | cv 5x2: chosen lr | its val loss, "
             "95% interval | its refit's test loss | cv rank of the single-seed pick |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for r in rows:
        low, high = r["cv_interval"]
        lines.append(f"| {r['seed']} | {r['single_lr']:.3g} | {r['single_test']:.4g} | {r['cv_lr']:.3g} | "
                     f"[{low:.4g}, {high:.4g}] | {r['cv_test']:.4g} | {r['single_in_cv']} |")  # fmt: skip
    single, cv = [r["single_test"] for r in rows], [r["cv_test"] for r in rows]
    lines.append(f"| median | | {statistics.median(single):.4g} | | | {statistics.median(cv):.4g} | |")
    outside = sum(r["single_in_cv"] > 5 for r in rows)
    lines.append(f"\nThe single-seed winner was outside the cross-validated top 5 in {outside} of "
                 f"{len(rows)} sampler seeds.")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cv_results.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        seeds = []
    if not seeds:
        parser.error("--seeds as integers like 0,1,2")
    with tempfile.TemporaryDirectory(prefix="gdlab-cv-") as folder:
        rows = [run_seed(seed, Path(folder)) for seed in seeds]
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
