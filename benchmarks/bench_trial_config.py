"""What making one sweep trial's validated config costs, per trial, in one process.

gdlab-sweep makes a config for every trial it asks (`gdlab.sweep.trials.trial_config`): at P = 4096 a batch
makes 4096. Measured on the shipped `lr` sweep (one plain number, optimizer.lr, a member key), best of
--repeats, interleaved: (v) through `gdlab.compose.VariantComposer` (a copy of the composed config, the value
set, the whole config validated: how trial configs were made before), and (t) `trial_config` as it is now
(`gdlab.population.PopulationComposer.config`: the value set on a copy of the validated shared config and
checked with the member rules). The first trial (Hydra's one composition) is left out of both.
Usage: python benchmarks/bench_trial_config.py [--trials 512] [--repeats 3] [--sweep lr]
"""

from __future__ import annotations

import argparse
import time

from gdlab.compose import VariantComposer
from gdlab.sweep.spec import load_sweep
from gdlab.sweep.trials import trial_config


def per_trial(make, trials: int) -> float:
    """Milliseconds per config, over `trials` learning rates."""
    start = time.perf_counter()
    for i in range(trials):
        make(0.001 * (1 + i / trials))
    return (time.perf_counter() - start) / trials * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", default="lr")
    args = parser.parse_args()
    spec = load_sweep(args.sweep, [])
    composer = VariantComposer([f"+sweep={spec.name}", *spec.overrides])
    variant = lambda lr: composer([f"optimizer.lr={lr}"])  # noqa: E731
    current = lambda lr: trial_config(spec, {"optimizer.lr": lr})  # noqa: E731
    assert variant(0.5) == current(0.5)[0]  # the same config, and both first compositions done
    before, after = [], []
    for _ in range(args.repeats):
        before.append(per_trial(variant, args.trials))
        after.append(per_trial(current, args.trials))
    print(f"{args.sweep} sweep, {args.trials} trials, best of {args.repeats}, ms per trial config:")
    print(f"  (v) VariantComposer, whole config validated   {min(before):6.2f}")
    ratio = min(before) / min(after)
    print(f"  (t) trial_config, member values checked       {min(after):6.2f}   {ratio:.1f}x faster")


if __name__ == "__main__":
    main()
