"""Bad input an adversarial pass let through or answered with a traceback: one line naming the key, exit 2."""

import pytest
from omegaconf import OmegaConf

from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.memory import member_bytes
from gdlab.population import Population, check_population, member_sections

CONFIG = [
    (
        ["dataset=circles", "dataset.factor=-1"],
        "dataset.factor=-1 is out of range; allowed: a number in [0, 1)",
    ),
    (["dataset=circles", "dataset.factor=1"], "dataset.factor=1 is out of range"),
    (["dataset.noise=1e308"], "dataset.noise=1e+308 is out of range; allowed: a number in [0, 100.0]"),
    (["tracking.dir=5"], "tracking.dir=5 is not allowed; use a non-empty string of at most 200 bytes"),
    (["tracking.experiment=5"], "tracking.experiment=5 is not allowed"),
    (
        ["tracking.plots=sometimes"],
        "tracking.plots='sometimes' is not allowed; choose one of true, false, auto",
    ),
    ([f"tracking.experiment={'x' * 300}"], "tracking.experiment='xxxxxxxx"),
    (["model.depth=1000000000000"], "model.width=16 model.depth=1000000000000 needs about"),  # no allocation
    (["dataset.n_samples=100000000000000000000"], "dataset.n_samples=100000000000000000000 (100,000,"),
    (["dataset=xor", "dataset.repeats=100000000000000"], "dataset.repeats=100000000000000 (400,000,"),
    (["optimizer=polyak", "optimizer.step_max=0"], "optimizer.step_max=0 is out of range"),  # not lr=0
    (["optimizer=nonmonotone", "optimizer.memory=100000000000"], "optimizer.memory=100000000000 needs about"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG)
def test_a_bad_key_is_named_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*overrides, "tracking=none"]))
    assert str(error.value).startswith(message), str(error.value)


def test_a_population_is_sized_as_a_whole():
    cfg = validate(compose_config(["model.width=100000", "tracking=none"]))  # one member fits
    with pytest.raises(ConfigError, match=r"^population: model.width=100000 model.depth=1 needs about .* for "
                                          r"5,000 population members, 1.1 GiB a member \(parameters 9.2 MiB, "
                                          r"optimizer state 0 B, activations 1.1 GiB\)"):  # fmt: skip
        check_population(Population([cfg] * 5000, [member_sections(OmegaConf.to_container(cfg))] * 5000,
                                    [[]] * 5000))  # fmt: skip


def test_bytes_per_member_add_up_to_what_one_member_allocates():
    """member_bytes counts what training holds: the parameters of the built network, and activations for
    every row of every layer."""
    import torch

    from gdlab.fit import build

    cfg = validate(compose_config(["model.depth=2", "model.width=8", "optimizer=adam", "tracking=none"]))
    data, model = build(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    parts = member_bytes(cfg)
    number = torch.finfo(model.layers[0][0].dtype).bits // 8
    assert parts["parameters"] == 3 * parameters * number
    assert parts["optimizer state"] == 2 * parameters * number  # Adam's two moments
    rows = len(data.train) + len(data.test)
    assert parts["activations"] == rows * sum(model.sizes) * 3 * number


SWEEP = [
    (
        ["hydra.sweeper.direction=up"],
        "sweeps/lr.yaml: hydra.sweeper.direction='up' is not allowed; choose one of minimize|maximize",
    ),  # fmt: skip
    (["gdlab_sweep.report_every=0"], "sweeps/lr.yaml: gdlab_sweep.report_every=0 is out of range"),
    (["gdlab_sweep.report_every=x"], "sweeps/lr.yaml: gdlab_sweep.report_every='x' must be an integer"),
    (["gdlab_sweep.max_failure_rate=2"], "sweeps/lr.yaml: gdlab_sweep.max_failure_rate=2 is out of range"),
    (["gdlab_sweep.max_failure_rate=nan"], "sweeps/lr.yaml: gdlab_sweep.max_failure_rate=nan is not allowed"),
    (["hydra.sweeper.n_trials=0"], "sweeps/lr.yaml: hydra.sweeper.n_trials=0 is out of range"),
    (["optimizer.lr=0.5"], "optimizer.lr=0.5 is ignored: this sweep searches optimizer.lr"),
    (
        ["--population", "100000", "model.width=100000"],
        "sweeps/lr.yaml: --population/gdlab_sweep.population: model.width=100000 model.depth=1 needs about",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("args", "message"), SWEEP)
def test_a_bad_sweep_setting_is_one_line_before_any_trial(refused, tmp_path, args, message):
    code, err = refused("lr", *args, "tracking=none")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"gdlab-sweep: error: {message}"), err
    assert not (tmp_path / "mlruns" / "optuna.db").exists()
