"""Time to quality: the best validation objective a sweep has reached against wall time (and trials), by
population size and sampler, over several sampler seeds.

For each shipped sweep (--sweeps), population size P (--populations) and strategy (--strategies), each seed
(--seeds) runs the whole `gdlab-sweep SWEEP --population P` command in a fresh folder (untracked, no refit:
what is measured is the search), on the sweep's budget or --budget. Trial values (the sweep's objective,
measured on the validation split) and completion times are read back from the Optuna storage; time counts
from the command's start, so start-up and asking are in it.

Strategies (samplers that fit batches):
  tpe     Optuna 5's TPESampler (multivariate, constant liar): the sweep files' default
  tpe-sobol  the same, a new study's first batch a scrambled Sobol cover (gdlab_sweep.first_batch=sobol)
  gp      GPSampler (its batch acquisition accounts for running trials), 10 random start-up trials
  qmc-gp  GPSampler whose start-up is a scrambled Sobol batch of P trials (independent_sampler=QMCSampler)
  random  RandomSampler: the floor

The reference is the trial-by-trial TPE sweep (P = 1, tpe): its median final best over the seeds is the
target, and each (P, strategy) says how long its median seed took to reach that target, as a fraction of the
reference's median wall time (target of issue 31: <= 1/3). A run that never reaches it counts as its whole
wall time and is marked. The same again for "within the reference's seed spread": a best inside the range
of the reference's final bests (at least as good as its worst seed's).

Usage: python benchmarks/bench_time_to_quality.py [--sweeps lr,lr_depth,digits_depth_width]
       [--populations 1,8,16,64] [--strategies tpe,gp,qmc-gp,random] [--seeds 5] [--budget N]
       [--overrides trainer.max_epochs=100 ...] [--json out.json] [--plot figure.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "tpe": [],
    "tpe-sobol": ["++gdlab_sweep.first_batch=sobol"],
    "gp": ["hydra/sweeper/sampler=gp"],
    "qmc-gp": ["hydra/sweeper/sampler=gp", "+hydra.sweeper.sampler.independent_sampler._target_="
               "optuna.samplers.QMCSampler", "+hydra.sweeper.sampler.independent_sampler.scramble=true"],
    "random": ["hydra/sweeper/sampler=random"],
}  # fmt: skip
# one line style per strategy
LINE_STYLES = {"tpe": "-", "tpe-sobol": (0, (5, 1, 1, 1)), "gp": "--", "qmc-gp": "-.", "random": ":"}
REFERENCE = (1, "tpe")
TARGET_RATIO = 1 / 3
SCRUBBED_ENV = ["MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE", "GDLAB_MLFLOW_PARENT_RUN_ID"]


def gdlab_sweep() -> str:
    local = Path(sys.executable).parent / "gdlab-sweep"
    return str(local) if local.exists() else "gdlab-sweep"


def strategy_overrides(strategy: str, population: int, seed: int) -> list[str]:
    overrides = [*STRATEGIES[strategy], f"hydra.sweeper.sampler.seed={seed}"]
    if strategy == "qmc-gp":
        overrides += [f"hydra.sweeper.sampler.n_startup_trials={population}",
                      f"+hydra.sweeper.sampler.independent_sampler.seed={seed}"]  # fmt: skip
    return overrides


def run_one(sweep: str, population: int, strategy: str, seed: int, budget: int | None,
            extra: list[str]) -> dict:  # fmt: skip
    """One whole command in a fresh folder: its trials' (seconds since start, value), in completion order."""
    import optuna

    with tempfile.TemporaryDirectory(prefix="gdlab-ttq-") as folder:
        storage = f"sqlite:///{Path(folder) / 'optuna.db'}"
        command = [gdlab_sweep(), sweep, "--population", str(population), "--storage", storage,
                   "--study", "ttq", "--no-refit", "--progress", "0", "tracking=none",
                   *strategy_overrides(strategy, population, seed), *extra]  # fmt: skip
        if budget:
            command += ["--budget", str(budget)]
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        start = time.time()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr[-2000:]}")
        study = optuna.load_study(study_name="ttq", storage=storage)
        finished = [t for t in study.trials if t.value is not None and t.datetime_complete is not None]
        points = sorted((t.datetime_complete.timestamp() - start, t.value) for t in finished)
        return {"wall": wall, "points": points, "maximize": study.direction.name == "MAXIMIZE"}


def best_so_far(points: list, maximize: bool) -> list[tuple[float, float]]:
    best, curve = None, []
    for seconds, value in points:
        if best is None or (value > best if maximize else value < best):
            best = value
        curve.append((seconds, best))
    return curve


def time_to(curve: list, target: float, maximize: bool, wall: float) -> tuple[float, bool]:
    """When the best-so-far first reaches `target` (its whole wall time, False, if never)."""
    for seconds, best in curve:
        if (best >= target) if maximize else (best <= target):
            return seconds, True
    return wall, False


def summarize(sweep: str, runs: dict) -> list[dict]:
    """Per (P, strategy): median final best and its spread, median wall, median time to the reference's
    median final best, as a fraction of the reference's median wall."""
    any_run = next(iter(runs.values()))[0]
    maximize = any_run["maximize"]
    finals = {key: [best_so_far(r["points"], maximize)[-1][1] for r in rs] for key, rs in runs.items()}
    reference = runs.get(REFERENCE)
    target = statistics.median(finals[REFERENCE]) if reference else None
    # "within its seed spread": inside the range of the reference's final bests (its worst seed's at most)
    within_spread = (min if maximize else max)(finals[REFERENCE]) if reference else None
    reference_wall = statistics.median(r["wall"] for r in reference) if reference else None
    rows = []
    for (population, strategy), rs in sorted(runs.items()):
        row = {"sweep": sweep, "P": population, "strategy": strategy, "seeds": len(rs),
               "best_median": statistics.median(finals[population, strategy]),
               "best_min": min(finals[population, strategy]), "best_max": max(finals[population, strategy]),
               "wall_median": statistics.median(r["wall"] for r in rs)}  # fmt: skip
        if target is not None:
            for suffix, goal in (("", target), ("_spread", within_spread)):
                reached = [time_to(best_so_far(r["points"], maximize), goal, maximize, r["wall"]) for r in rs]
                row[f"target{suffix}"] = goal
                row[f"time_to_target{suffix}_median"] = statistics.median(seconds for seconds, _ in reached)
                row[f"reached{suffix}"] = sum(ok for _, ok in reached)
                row[f"vs_reference_wall{suffix}"] = row[f"time_to_target{suffix}_median"] / reference_wall
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| sweep | P | strategy | seeds | best (median, min-max) | wall s | to median s | reached | "
          "/ sequential TPE wall | to spread s | reached | / sequential TPE wall |")  # fmt: skip
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = []
        for suffix in ("", "_spread"):
            if f"target{suffix}" not in r:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{r[f'time_to_target{suffix}_median']:.1f}", f"{r[f'reached{suffix}']}/{r['seeds']}",
                      f"{r[f'vs_reference_wall{suffix}']:.2f}"]  # fmt: skip
        print(
            f"| {r['sweep']} | {r['P']} | {r['strategy']} | {r['seeds']} | {r['best_median']:.4g} "
            f"({r['best_min']:.4g}-{r['best_max']:.4g}) | {r['wall_median']:.1f} | {' | '.join(cells)} |"
        )


def plot(all_runs: dict, path: Path) -> None:
    """Best-so-far against seconds: one panel per sweep, one line per (P, strategy), the median over seeds
    at each moment (a seed's curve is a step function of its completions, the worst value before them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(all_runs), figsize=(7 * len(all_runs), 5), squeeze=False)
    for ax, (sweep, runs) in zip(axes[0], all_runs.items(), strict=True):
        horizon = max(r["wall"] for rs in runs.values() for r in rs)
        grid = np.linspace(0, horizon, 400)
        for (population, strategy), rs in sorted(runs.items()):
            curves = []
            for r in rs:
                steps = best_so_far(r["points"], r["maximize"])
                times = np.array([s for s, _ in steps])
                values = np.array([v for _, v in steps])
                at = np.searchsorted(times, grid, side="right") - 1
                worst = -np.inf if r["maximize"] else np.inf  # nothing found yet: the median stays monotone
                curves.append(np.where(at >= 0, values[np.clip(at, 0, None)], worst))
            median = np.median(np.array(curves), axis=0)
            median[~np.isfinite(median)] = np.nan
            colour = f"C{sorted({p for p, _ in runs}).index(population)}"  # one colour per P
            ax.plot(grid, median, linestyle=LINE_STYLES[strategy], color=colour,
                    label=f"P={population} {strategy}")  # fmt: skip
        maximize = next(iter(runs.values()))[0]["maximize"]
        ax.set(title=f"{sweep}: best validation objective so far (median of seeds)", xlabel="seconds",
               ylabel="best objective", yscale="linear" if maximize else "log")  # fmt: skip
        finals = [best_so_far(r["points"], r["maximize"])[-1][1] for rs in runs.values() for r in rs]
        if finals and maximize:  # an accuracy: from a little below the worst final best to the best
            spread = max(max(finals) - min(finals), 0.005)
            ax.set_ylim(min(finals) - 3 * spread, max(finals) + 0.5 * spread)
        elif finals and min(finals) > 0:  # a loss: from the best found to 1.5x the worst
            ax.set_ylim(min(finals) * 0.95, max(finals) * 1.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="lr,lr_depth,digits_depth_width")
    parser.add_argument("--populations", default="1,8,16,64")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, help="finished trials per sweep (default: each sweep's own)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra overrides for every trial")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    if unknown := set(strategies) - set(STRATEGIES):
        parser.error(f"--strategies: {sorted(unknown)} not in {sorted(STRATEGIES)}")
    all_runs, rows = {}, []
    for sweep in args.sweeps.split(","):
        runs: dict = {}
        for population in map(int, args.populations.split(",")):
            for strategy in strategies:
                if population == 1 and strategy == "tpe-sobol":  # no batch to spread: tpe's own trials
                    continue
                for seed in range(args.seeds):
                    result = run_one(sweep, population, strategy, seed, args.budget, args.overrides)
                    runs.setdefault((population, strategy), []).append(result)
                    best = best_so_far(result["points"], result["maximize"])[-1][1]
                    print(f"{sweep} P={population} {strategy} seed {seed}: {len(result['points'])} trials, "
                          f"best {best:.4g}, {result['wall']:.1f} s", flush=True)  # fmt: skip
        all_runs[sweep] = runs
        rows += summarize(sweep, runs)
    print_table(rows)
    if args.json:
        runs = {sweep: {f"{p}:{k}": v for (p, k), v in r.items()} for sweep, r in all_runs.items()}
        args.json.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    if args.plot:
        plot(all_runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
