"""The README's PBT results: PBT with P = 32 against the best fixed lr of 32 at the same member-epochs.

For each dataset (moons: sweeps/lr_pbt.yaml against sweeps/lr.yaml; digits: sweeps/digits_lr_pbt.yaml
against `lr dataset=digits`) and each seed s, two gdlab-sweep commands in a fresh directory:
  PBT    gdlab-sweep lr_pbt seed=s gdlab_sweep.pbt.seed=s hydra.sweeper.sampler.seed=s tracking=none
  fixed  gdlab-sweep lr seed=s hydra.sweeper.sampler.seed=s tracking=none --budget 32 --population 32
Both train 32 members x 300 epochs from the same initial weights (seed s) on the training rows, their
learning rates drawn log-uniform over [1e-3, 10] (the fixed sweep's TPE draws its first batch at random
too), and both rank members on the validation loss (the sweeps' objective; PBT at every round, the fixed
sweep once at the end). Each then trains its choice once more on the training and validation rows (the
fixed sweep its best lr, PBT its best member's schedule, replayed) and measures the test split once: its
`result: test/loss=...` line. Printed as a Markdown table: median and range over the seeds, and each
seed's value. With --lineage DIR, each shipped PBT sweep as it is (tracked) and
gdlab-report's lineage figure and best schedule, copied to DIR.
Usage: python docs/pbt_results.py [--seeds 0,1,2,3,4] [--datasets moons,digits] [--lineage docs/pbt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna

SWEEPS = {  # dataset: (PBT sweep, fixed-lr sweep and its overrides)
    "moons": ("lr_pbt", ["lr"]),
    "digits": ("digits_lr_pbt", ["lr", "dataset=digits"]),
}
SCRUBBED_ENV = ["MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE", "GDLAB_MLFLOW_PARENT_RUN_ID"]


def gdlab(command: str, *args: str, cwd: Path) -> str:
    executable = str(Path(sys.executable).with_name(command))
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    done = subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{command} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def best_of(cwd: Path, study: str) -> optuna.trial.FrozenTrial:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{cwd}/mlruns/optuna.db").best_trial


def run_seed(dataset: str, seed: int, cwd: Path) -> dict:
    pbt_sweep, (fixed_sweep, *fixed_overrides) = SWEEPS[dataset]
    seeded = [f"seed={seed}", f"hydra.sweeper.sampler.seed={seed}", "tracking=none"]
    pbt_out = gdlab("gdlab-sweep", pbt_sweep, *seeded, f"gdlab_sweep.pbt.seed={seed}",
                    "--study", f"pbt-{dataset}-{seed}", "--progress", "0", cwd=cwd)  # fmt: skip
    fixed_out = gdlab("gdlab-sweep", fixed_sweep, *fixed_overrides, *seeded, "--budget", "32", "--population",
                      "32", "--study", f"fixed-{dataset}-{seed}", "--progress", "0", cwd=cwd)  # fmt: skip
    pbt, fixed = best_of(cwd, f"pbt-{dataset}-{seed}"), best_of(cwd, f"fixed-{dataset}-{seed}")
    return {"dataset": dataset, "seed": seed, "pbt": test_loss(pbt_out), "fixed": test_loss(fixed_out),
            "pbt_val": pbt.value, "fixed_val": fixed.value, "fixed_lr": fixed.params["optimizer.lr"],
            "pbt_replay": pbt.user_attrs.get("pbt.replay")}  # fmt: skip


def test_loss(stdout: str) -> float:
    """The sweep's result: the refit's test loss, measured once (its last line)."""
    match = re.search(r"^gdlab-sweep: result: test/loss=([-0-9.e+]+)", stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no result line in:\n{stdout[-1500:]}")
    return float(match.group(1))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def table(results: list[dict]) -> str:
    lines = ["| dataset | best fixed lr of 32, refit | PBT, P = 32, best member replayed | PBT better in | "
             "per seed (fixed / PBT) |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        better = sum(r["pbt"] < r["fixed"] for r in rows)
        seeds = ", ".join(f"{r['fixed']:.4f} / {r['pbt']:.4f}" for r in rows)
        fixed, pbt = summary([r["fixed"] for r in rows]), summary([r["pbt"] for r in rows])
        lines.append(f"| {dataset} | {fixed} | {pbt} | {better} of {len(rows)} seeds | {seeds} |")
    return "\n".join(lines)


def lineage(dataset: str, cwd: Path, out: Path) -> None:
    """The shipped PBT sweep as it is, tracked; its report's lineage figure and best schedule go to `out`."""
    pbt_sweep = SWEEPS[dataset][0]
    gdlab("gdlab-sweep", pbt_sweep, "--progress", "0", cwd=cwd)
    reports = sorted((cwd / "outputs" / "sweeps" / pbt_sweep).glob("report-*"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(reports[-1] / "pbt_lineage.png", out / f"{dataset}_lineage.png")
    shutil.copy(reports[-1] / "pbt_best_schedule.json", out / f"{dataset}_best_schedule.json")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = [-1]
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers >= 0, e.g. 0,1,2")
    return seeds


def dataset_list(text: str) -> list[str]:
    unknown = [d for d in text.split(",") if d not in SWEEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not one of {','.join(SWEEPS)}")
    return text.split(",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, default="0,1,2,3,4",
                        help="comma-separated seeds >= 0 (default: 0,1,2,3,4)")  # fmt: skip
    parser.add_argument("--datasets", type=dataset_list, default="moons,digits",
                        help=f"comma-separated, from {','.join(SWEEPS)} (default: all)")  # fmt: skip
    parser.add_argument(
        "--lineage", type=Path, help="also run each shipped PBT sweep and copy its lineage here"
    )
    parser.add_argument("--json", type=Path, help="write every seed's figures here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="gdlab-pbt-") as folder:
        cwd = Path(folder)
        for dataset in args.datasets:
            for seed in args.seeds:
                results.append(run_seed(dataset, seed, cwd))
                print(json.dumps(results[-1]), flush=True)
            if args.lineage:
                lineage(dataset, cwd, args.lineage)
    seeds = ",".join(map(str, args.seeds))
    print(
        f"\nthe refit's test loss (chosen on validation, measured once), median [min, max] over seeds "
        f"{seeds}:\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
