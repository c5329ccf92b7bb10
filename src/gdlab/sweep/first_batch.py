"""A new study's first population batch, spread over the search space by a scrambled Sobol sequence.

A batch asked before any trial has finished gives a model-based sampler (TPE, GP) nothing to learn from:
it draws its random start-up trials. Random points leave gaps and clumps; a Sobol batch covers the space
evenly, so the best of the first batch is closer to the best there is, and the sampler's model starts from
an even cover. The points are Optuna's own `QMCSampler` draws (its search-space transform and scipy's Sobol
generator), enqueued with `study.enqueue_trial`, so the sweep's sampler hands them out and records them as
every other trial; from the second batch on it samples as usual.

`gdlab_sweep.first_batch: sobol`, or `sampler` (the default: the sweep's sampler draws it; the shipped
sweeps' recorded results were drawn so, and benchmarks/bench_time_to_quality.py measures the two).
Only the process that created the study enqueues (two invocations starting together must not both), only
with population batches (P >= 2), and only in front of a sampler that would draw blind: a random, QMC or
grid sampler already covers the space as it means to.
"""

from __future__ import annotations

import optuna

FIRST_BATCH = ("sobol", "sampler")  # gdlab_sweep.first_batch's values
BLIND_SAMPLERS = (optuna.samplers.RandomSampler, optuna.samplers.QMCSampler, optuna.samplers.GridSampler)


def sobol_points(distributions: dict, count: int, seed: int | None) -> list[dict]:
    """`count` scrambled Sobol points over `distributions` (Optuna's), as `QMCSampler.sample_relative`
    maps them: log scales and steps respected, a categorical as one coordinate over [0, number of choices)."""
    from optuna._transform import _SearchSpaceTransform
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from scipy.stats import qmc

    categorical = {k: d for k, d in distributions.items() if isinstance(d, CategoricalDistribution)}
    pseudo = {k: FloatDistribution(0, len(d.choices)) for k, d in categorical.items()}
    transform = _SearchSpaceTransform(distributions | pseudo, transform_0_1=True)
    points = []
    for row in qmc.Sobol(d=len(distributions), scramble=True, seed=seed).random(count):
        values = transform.untransform(row)
        points.append({k: d.to_external_repr(int(values[k])) if (d := categorical.get(k)) else values[k]
                       for k in distributions})  # fmt: skip
    return points


def enqueue_first_batch(study: optuna.Study, spec, n_trials: int) -> int:
    """On a study this process has just created: enqueue its first batch as Sobol points (as many as
    one population batch, and at most the `n_trials` this invocation will run, within its budget: none is
    left waiting for a later invocation), when the sweep asks for it and its sampler would draw blind.
    Whichever process asks first (this one, a worker, a launcher's job) trains them. Returns how many."""
    size = min(spec.population, n_trials)
    if spec.first_batch != "sobol" or size < 2 or isinstance(spec.sampler, BLIND_SAMPLERS):
        return 0
    for params in sobol_points(spec.distributions, size, spec.sampler_cfg.get("seed")):
        study.enqueue_trial(params, user_attrs={"first_batch": "sobol"})
    return size


def say_drawn_blind(sampler, trials: list) -> None:
    """A model-based sampler's batch asked before any trial finished: said aloud, with how it was drawn
    (gdlab.sweep.first_batch's Sobol points, or the sampler's random start-up draws)."""
    if isinstance(sampler, BLIND_SAMPLERS):
        return
    numbers = {trial.number for trial in trials}  # one storage read for the batch, not one per trial
    sobol = sum(t.number in numbers and t.user_attrs.get("first_batch") == "sobol"
                for t in trials[0].study.get_trials(deepcopy=False))  # fmt: skip
    how = (f"{sobol} of them are a scrambled Sobol cover of the search space (gdlab_sweep.first_batch)"
           if sobol else "this batch is its start-up draws (random)")  # fmt: skip
    print(f"gdlab-sweep: {len(trials)} trials asked before any finished: {type(sampler).__name__} has "
          f"nothing to learn from yet, so {how}", flush=True)  # fmt: skip
