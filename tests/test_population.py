"""Population mode: each member trains exactly as it would alone, and retires alone."""

import math
import re
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

import warm
from gdlab.compose import VariantComposer, compose_config
from gdlab.config import ConfigError, validate
from gdlab.fit import fit_population
from gdlab.members import Retire
from gdlab.train import run

BASE = ["tracking=none", "dataset=moons", "dataset.n_samples=200", "trainer.max_epochs=40"]
MEMBERS = [
    {"optimizer.lr": 0.05, "seed": 1},
    {"optimizer.lr": 0.5, "seed": 2},
    {"optimizer.lr": 2.0, "seed": 3},
]
CURVES = ["train/loss", "train/acc", "test/loss", "test/acc", "grad_norm", "step", "trial_step", "loss_after"]
COUNTS = ["backtracks", "ls_failures", "evals/fwd", "evals/fwdbwd", "evals/total"]
MODES = {
    "gd": ["optimizer=gd"],
    "momentum": ["optimizer=momentum", "optimizer.momentum=0.8", "optimizer.nesterov=true"],
    "adam": ["optimizer=adam"],
    "armijo": ["optimizer=backtracking", "optimizer.lr_max=20"],
    "armijo-reuse-grow": ["optimizer=backtracking", "optimizer.lr_max=20", "optimizer.reset=grow",
                          "optimizer.growth=1.1", "optimizer.trial_eval=forward_backward"],
}  # fmt: skip


def alone(overrides: list[str], member: dict):
    return run([*overrides, *(f"{k}={v}" for k, v in member.items())])


def assert_same_curves(population_history, single_history):
    assert list(population_history.columns) == list(single_history.columns)
    assert len(population_history) == len(single_history)
    for column in CURVES:
        np.testing.assert_allclose(population_history[column], single_history[column], rtol=0, atol=1e-8,
                                   err_msg=column)  # fmt: skip
    for column in COUNTS:
        assert population_history[column].tolist() == single_history[column].tolist(), column


@pytest.mark.parametrize("backprop", ["autograd", "manual"])
@pytest.mark.parametrize("mode", list(MODES))
def test_each_member_trains_as_it_would_alone(mode, backprop):
    overrides = [*BASE, *MODES[mode], f"backprop={backprop}"]
    members = [
        {**m, "optimizer.lr": m["optimizer.lr"] * (4 if mode.startswith("armijo") else 1)} for m in MEMBERS
    ]
    results = run(overrides, population=members)
    assert len(results) == len(members)
    for member, result in zip(members, results, strict=True):
        single = alone(overrides, member)
        assert_same_curves(result.history, single.history)
        assert result.final["train/loss"] == pytest.approx(single.final["train/loss"], abs=1e-8)
        assert result.final["evals"] == single.final["evals"]
    if mode.startswith("armijo"):  # the members really searched differently
        assert len({r.history["backtracks"].sum() for r in results}) > 1


def test_a_diverging_member_retires_and_leaves_the_others_unchanged():
    overrides = [*BASE, "optimizer=gd"]
    with_diverging = run(overrides, population=[MEMBERS[0], {"optimizer.lr": 1e200, "seed": 5}, MEMBERS[1]])
    without = run(overrides, population=[MEMBERS[0], MEMBERS[1]])
    diverged = with_diverging[1]
    assert diverged.final["diverged_at"] is not None and diverged.final["diverged_at"] < 10
    assert len(diverged.history) == diverged.final["diverged_at"] + 1
    assert not math.isfinite(diverged.history["train/loss"].iloc[-1])
    assert math.isnan(diverged.final["objective"])
    for kept, reference in zip([with_diverging[0], with_diverging[2]], without, strict=True):
        assert kept.final["diverged_at"] is None and len(kept.history) == 40
        assert_same_curves(kept.history, reference.history)


def test_a_member_that_reaches_its_stop_loss_or_is_pruned_retires_alone():
    cfgs = [validate(compose_config([*BASE, "optimizer=gd", f"optimizer.lr={lr}", f"seed={s}"]))
            for lr, s in ((0.5, 1), (2.0, 2), (1.0, 3))]  # fmt: skip
    cfgs[1].trainer.stop_loss = 0.4

    def prune_at_epoch_7(row):
        if row["epoch"] == 7:
            raise Retire("pruned at epoch 7")

    results = fit_population(cfgs, epoch_callbacks=[[], [], [prune_at_epoch_7]])
    full, stopped, pruned = results
    assert len(full.history) == 40 and full.final["pruned"] is None
    assert stopped.history["train/loss"].iloc[-1] < 0.4 <= stopped.history["train/loss"].iloc[-2]
    assert len(pruned.history) == 8 and pruned.final["pruned"] == "pruned at epoch 7"
    single = alone([*BASE, "optimizer=gd"], {"optimizer.lr": 0.5, "seed": 1})
    assert_same_curves(full.history, single.history)


def test_members_of_different_architectures_train_as_separate_populations():
    results = run(
        [*BASE, "optimizer=gd"], population=[["model.depth=1"], ["model.depth=2"], {"model.depth": 1}]
    )
    assert [r.config.model.depth for r in results] == [1, 2, 1]
    assert [len(r.model.layers) for r in results] == [2, 3, 2]
    assert_same_curves(results[1].history, alone([*BASE, "optimizer=gd"], {"model.depth": 2}).history)


def test_an_optimizer_without_a_population_form_is_refused_before_training():
    with pytest.raises(
        ConfigError, match=r"optimizer.name='lbfgs' cannot train as a population .*one member"
    ):
        run([*BASE, "optimizer=lbfgs"], population=[{"optimizer.lr": 0.1}, {"optimizer.lr": 0.01}])


def test_variant_composer_matches_hydra_compose():
    compose = VariantComposer(["dataset=xor"])
    for variant in (["optimizer.lr=0.3", "seed=4"], ["init=he", "model.width=[3,5]", "model.depth=2"],
                    ["optimizer=backtracking", "optimizer.c=0.2"]):  # fmt: skip
        assert compose(variant) == validate(compose_config(["dataset=xor", *variant]))


def test_a_trial_config_is_what_hydra_composes_and_gdlab_validates():
    """gdlab-sweep's trial configs, made the quick way where a trial's values are plain numbers on member
    keys: equal to Hydra's composition validated, for every shipped sweep's edge values; polyak's lr that
    follows step_max (an interpolation) and a refused value as validation has them."""
    from gdlab.population import PopulationComposer
    from gdlab.sweep.spec import available_sweeps, edge_values, load_sweep
    from gdlab.sweep.trials import trial_config

    checked = 0
    for name in available_sweeps():
        spec = load_sweep(name, [])
        for edge in (0, -1):
            params = {key: edge_values(space)[edge] for key, space in spec.distributions.items()}
            cfg, overrides = trial_config(spec, params)
            expected = OmegaConf.to_yaml(validate(compose_config(overrides)))  # types too: 1, 1.0, true
            assert OmegaConf.to_yaml(cfg) == expected, (name, params)
            checked += 1
    assert checked == 2 * len(available_sweeps()) >= 20
    polyak = PopulationComposer(["dataset=xor", "optimizer=polyak"])
    cfg = polyak.config({"optimizer.step_max": 0.7})
    assert cfg == validate(compose_config(["dataset=xor", "optimizer=polyak", "optimizer.step_max=0.7"]))
    assert cfg.optimizer.lr == 0.7
    quick = PopulationComposer(["dataset=xor"])
    assert quick.config({"optimizer.lr": 0.2, "seed": 5}).optimizer.lr == 0.2
    refusals = [
        (["dataset=xor"], {"optimizer.lr": -1.0}),
        (["dataset=moons", "dataset.val_size=0", "dataset.cv_folds=5"],
         {"optimizer.lr": -1.0, "dataset.cv_fold": 7}),  # two bad: validation's first
        (["dataset=xor"], {"init": 1}),  # a number for a config group
    ]  # fmt: skip
    for shared, values in refusals:
        with pytest.raises(Exception) as refused:
            validate(compose_config([*shared, *[f"{key}={value}" for key, value in values.items()]]))
        with pytest.raises(type(refused.value), match=re.escape(str(refused.value))):
            PopulationComposer(shared).config(values)
    momentum = ["dataset=xor", "optimizer=sgd", "optimizer.nesterov=true"]  # valid only with the member's
    assert PopulationComposer(momentum).config({"optimizer.momentum": 0.9}) == validate(
        compose_config([*momentum, "optimizer.momentum=0.9"])
    )


@pytest.mark.slow
def test_gdlab_sweep_population_mode_tells_each_trial_and_tracks_each_member(tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    done = warm.run(
        [str(bin_dir / "gdlab-sweep"), "lr", "--population", "4", "--budget", "6", "trainer.max_epochs=25"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-lr").experiment_id])
    children = {r.data.tags["optuna.trial"]: r for r in runs if "optuna.trial" in r.data.tags}
    assert sorted(children, key=int) == [str(t.number) for t in trials]
    assert sorted(r.data.tags["gdlab.population"] for r in children.values()) == [
        "2",
        "2",
        "4",
        "4",
        "4",
        "4",
    ]
    for trial in trials:
        child = children[str(trial.number)]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert child.data.metrics["final/objective"] == pytest.approx(trial.value)
        curve = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in curve] == list(range(26))  # 25 epochs, then the trained weights' value
        history = (
            tmp_path / "outputs" / "sweeps" / "lr" / f"trial-{trial.number}" / "history.csv"
        ).read_text()
        assert len(history.splitlines()) == 26


@pytest.mark.slow
def test_the_seeds_grid_sweep_trains_its_ten_seeds_as_one_population(tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    done = warm.run([str(bin_dir / "gdlab-sweep"), "seeds", "trainer.max_epochs=50", "tracking=none"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="seeds", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["seed"] for t in trials) == list(range(10))  # the grid, each point once
    seed_7 = next(t for t in trials if t.params["seed"] == 7)
    alone_7 = run(["+sweep=seeds", "trainer.max_epochs=50", "tracking=none", "seed=7"])
    assert seed_7.value == pytest.approx(alone_7.final["train/loss"], abs=1e-10)


def test_minibatch_members_share_the_seed_and_train_as_they_would_alone():
    overrides = [*BASE, "optimizer=sgd", "optimizer.batch_size=64", "seed=3", "trainer.max_epochs=15"]
    members = [{"optimizer.lr": 0.05}, {"optimizer.lr": 0.3}]
    results = run(overrides, population=members)
    for member, result in zip(members, results, strict=True):
        assert_same_curves(result.history, alone(overrides, member).history)
    assert results[0].history["train/loss"].iloc[-1] != results[1].history["train/loss"].iloc[-1]


MIXED_SWEEP = """# @package _global_
defaults:
  - override /dataset: moons
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: grid
trainer:
  max_epochs: 12
objective: train/loss
tracking:
  backend: none
hydra:
  sweeper:
    study_name: mixed
    storage: sqlite:///mlruns/optuna.db
    direction: minimize
    n_trials: 4
    params:
      optimizer: choice(gd, adam)
      optimizer.lr: choice(0.1, 1e200)
gdlab_sweep:
  population: 4
  max_failure_rate: 1.0
"""


@pytest.mark.slow
def test_a_mixed_population_batch_fails_only_the_diverging_trials(tmp_path: Path):
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "mixed.yaml").write_text(MIXED_SWEEP)
    bin_dir = Path(sys.executable).parent
    done = warm.run([str(bin_dir / "gdlab-sweep"), "mixed", "--config-dir", str(tmp_path / "conf")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="mixed", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    states = {(t.params["optimizer"], t.params["optimizer.lr"]): t for t in study.get_trials(deepcopy=False)}
    assert sorted(states) == [("adam", 0.1), ("adam", 1e200), ("gd", 0.1), ("gd", 1e200)]
    for optimizer in ("gd", "adam"):
        assert states[(optimizer, 0.1)].state == TrialState.COMPLETE
        assert states[(optimizer, 1e200)].state == TrialState.FAIL
        assert "NaN/inf" in states[(optimizer, 1e200)].user_attrs["failure"]
        single = run(["dataset=moons", "trainer.max_epochs=12", "tracking=none", "objective=train/loss",
                      f"optimizer={optimizer}", "optimizer.lr=0.1"])  # fmt: skip
        assert states[(optimizer, 0.1)].value == pytest.approx(single.final["train/loss"], abs=1e-10)


@pytest.mark.parametrize(
    "failure",
    [["optimizer.on_failure=revert"],
     ["optimizer.on_failure=tiny_step", "optimizer.tiny_step=0.01", "optimizer.trial_eval=forward_backward",
      "optimizer.reset=grow"]],
)  # fmt: skip
def test_failed_line_searches_revert_or_tiny_step_per_member_as_alone(failure):
    overrides = [*BASE, "optimizer=backtracking", "optimizer.lr=20", "optimizer.lr_max=50",
                 "optimizer.max_backtracks=2", *failure]  # fmt: skip
    members = [{"seed": 1, "optimizer.c": 0.1}, {"seed": 2, "optimizer.c": 0.5}]
    results = run(overrides, population=members)
    for member, result in zip(members, results, strict=True):
        assert result.history["ls_failures"].iloc[-1] > 0  # the failure path really ran
        assert_same_curves(result.history, alone(overrides, member).history)
