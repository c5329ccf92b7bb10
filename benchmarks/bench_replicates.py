"""What repeating each trial costs: the whole `gdlab-sweep lr` command (64 trials, population mode,
untracked, refit included) with 5 replicates and with 5-fold cross-validation, against the sweep as shipped.

Each variant runs in a fresh study in a temporary directory, in this one invocation; its whole command is
timed (start-up, training, the refit). Target: each repeated sweep (320 members) <= 3x the plain one.
Usage: python benchmarks/bench_replicates.py [--trials 64] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 3.0
VARIANTS = {
    "plain": [],
    "5 replicates": ["--replicates", "5"],
    "5 folds": ["++gdlab_sweep.cv_folds=5"],
}


def run_sweep(extra: list[str], trials: int) -> float:
    """Seconds of one whole `gdlab-sweep lr` command in a fresh study."""
    gdlab_sweep = str(Path(sys.executable).with_name("gdlab-sweep"))
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GDLAB_MLFLOW_PARENT_RUN_ID")
    }
    with tempfile.TemporaryDirectory() as folder:
        command = [gdlab_sweep, "lr", "--budget", str(trials), "--n-trials", str(trials), "--progress", "0",
                   "--population", str(trials),  # one population, as measured (the README's figures)
                   "--storage", f"sqlite:///{folder}/optuna.db", "tracking=none", *extra]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(extra) or 'plain'}: gdlab-sweep exited {proc.returncode}: {proc.stderr[-500:]}"
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each variant")
    parser.add_argument("--json")
    args = parser.parse_args()
    seconds = {name: min(run_sweep(extra, args.trials) for _ in range(args.repeats))
               for name, extra in VARIANTS.items()}  # fmt: skip
    print(f"gdlab-sweep lr, {args.trials} trials, untracked, whole command (best of {args.repeats}):")
    ok = True
    for name, value in seconds.items():
        ratio = value / seconds["plain"]
        verdict = (
            "" if name == "plain" else (" (target <= 3x: met)" if ratio <= TARGET else " (target: NOT met)")
        )
        ok &= name == "plain" or ratio <= TARGET
        print(f"  {name:<14} {value:7.1f} s  {ratio:5.2f}x{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(seconds, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
