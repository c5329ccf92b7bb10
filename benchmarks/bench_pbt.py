"""What PBT costs a population: sweeps/lr_pbt.yaml's population trained with and without PBT, in one process.

The population: 32 members of the lr sweep's moons net (300 epochs of full-batch GD, learning rates drawn
log-uniform over [1e-3, 10] with a fixed seed), trained as one batched model by gdlab.fit.fit_population:
  (p) the plain population;
  (q) the same with the sweep's PBT (every 20 epochs the bottom quarter copies the top quarter and
      explores), which also logs hp/optimizer.lr every epoch and writes each member's pbt.json.
Both untracked and, with --tracking local, tracked into a temporary MLflow store (as gdlab-sweep does).
Seconds per population, best of --repeats, interleaved. Target: (q) <= 1.2x (p).
Usage: python benchmarks/bench_pbt.py [--members 32] [--repeats 3] [--tracking none,local] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from optuna.distributions import FloatDistribution

from gdlab.compose import VariantComposer
from gdlab.fit import fit_population
from gdlab.pbt import PopulationBasedTraining
from gdlab.pbt_rules import PBTSettings

TARGET = 1.2
LR = FloatDistribution(1e-3, 10.0, log=True)
SETTINGS = PBTSettings(interval=20, fraction=0.25, perturb=(1.2, 0.8), resample_probability=0.25,
                       hyperparameters={"optimizer.lr": LR}, seed=0)  # fmt: skip


def population(members: int, tracking: str, folder: Path) -> tuple[list, list]:
    rng = random.Random(42)
    lrs = [math.exp(rng.uniform(math.log(1e-3), math.log(10.0))) for _ in range(members)]
    base = ["+sweep=lr_pbt", f"tracking={tracking}", f"tracking.dir={folder}"]
    compose = VariantComposer(base)
    overrides = [[f"optimizer.lr={lr!r}"] for lr in lrs]
    return [compose(o) for o in overrides], [[*base, *o] for o in overrides]


def time_population(cfgs, overrides, folder: Path, with_pbt: bool, label: str) -> float:
    pbt = PopulationBasedTraining(SETTINGS, "test/loss", "minimize", len(cfgs)) if with_pbt else None
    dirs = [folder / label / f"member-{i}" for i in range(len(cfgs))]
    started = time.perf_counter()
    fit_population(cfgs, overrides, output_dirs=dirs, pbt=pbt)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tracking", default="none,local")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gdlab-bench-pbt-") as folder:
        folder = Path(folder)
        for tracking in args.tracking.split(","):
            cfgs, overrides = population(args.members, tracking, folder)
            time_population(cfgs, overrides, folder, True, "warm-up")  # imports, the writer process
            times = {"p": [], "q": []}
            for repeat in range(args.repeats):
                for mode in ("p", "q"):
                    label = f"{tracking}-{mode}-{repeat}"
                    times[mode].append(time_population(cfgs, overrides, folder, mode == "q", label))
            best = {mode: min(values) for mode, values in times.items()}
            results[tracking] = {**best, "ratio": best["q"] / best["p"], "all": times}
            epochs = args.members * cfgs[0].trainer.max_epochs
            verdict = "ok" if best["q"] / best["p"] <= TARGET else "MISSED"
            print(f"tracking={tracking}: (p) population {best['p']:.2f} s "
                  f"({epochs / best['p']:.0f} member-epochs/s), (q) with PBT {best['q']:.2f} s: "
                  f"(q)/(p) = {best['q'] / best['p']:.3f} (target <= {TARGET}) {verdict}",
                  flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
