"""gdlab.run: training behaviour, the history, and the lab figures."""

import math

import numpy as np
import pytest
import torch

import gdlab


def run(overrides):
    return gdlab.run([*overrides, "tracking=none"])


XOR_LAB_002 = [
    "dataset=xor", "dataset.repeats=500", "model.depth=2", "model.width=8", "model.activation=relu",
    "model.head=softmax", "loss=ce", "init=he", "optimizer=gd", "optimizer.lr=0.1",
]  # fmt: skip
MOONS_LAB_003 = [
    "dataset=moons", "dataset.n_samples=500", "dataset.noise=0.2", "dataset.test_size=0.2",
    "dataset.standardize=true", "model.depth=1", "model.width=16", "model.activation=relu",
    "model.head=sigmoid", "loss=bce", "init=torch_default", "trainer.max_epochs=300", "seed=42",
]  # fmt: skip
STEP_RECORD = ["loss_before", "loss_after", "trial_step", "step", "backtracks", "ls_failed",
               "ls_failures", "evals/fwd", "evals/fwdbwd", "evals/total", "grad_norm"]  # fmt: skip


def test_manual_and_autograd_give_the_same_500_step_curve():
    common = ["dataset=moons", "model.depth=2", "model.width=8", "model.activation=tanh",
              "trainer.max_epochs=500", "optimizer.lr=0.5"]  # fmt: skip
    auto = run([*common, "backprop=autograd"]).history["train/loss"].to_numpy()
    manual = run([*common, "backprop=manual"]).history["train/loss"].to_numpy()
    assert len(auto) == len(manual) == 500
    assert auto[-1] < 0.5 * auto[0]
    np.testing.assert_allclose(manual, auto, rtol=0, atol=1e-9)


def test_history_has_one_row_per_epoch_and_the_step_record():
    r = run(["dataset=moons", "optimizer=backtracking", "trainer.max_epochs=20"])
    h = r.history
    assert list(h["epoch"]) == list(range(20))
    for column in ["train/loss", "train/acc", "test/loss", "test/acc", "grad_norm/layer1",
                   "grad_norm/layer2", *STEP_RECORD]:  # fmt: skip
        assert column in h.columns, column
    # Backtracking: the accepted step's loss is the next epoch's starting loss.
    np.testing.assert_allclose(h["loss_after"].iloc[:-1], h["train/loss"].iloc[1:], rtol=1e-12)
    assert (h["evals/fwdbwd"] == 1).all() and (h["evals/fwd"] == h["backtracks"] + 1).all()
    assert h["evals/total"].iloc[-1] == r.final["evals"] == r.final["evals_fwd"] + r.final["evals_fwdbwd"]
    layer_norms = np.hypot(h["grad_norm/layer1"], h["grad_norm/layer2"])
    np.testing.assert_allclose(layer_norms, h["grad_norm"], rtol=1e-12)
    assert r.final["epochs"] == 20 and r.final["train/loss"] < h["train/loss"].iloc[0]
    assert r.final["objective"] == r.final["train/loss"]  # default objective


def test_gd_record_uses_the_fixed_lr_and_one_evaluation_per_step():
    h = run(["dataset=xor", "optimizer.lr=0.3", "trainer.max_epochs=5"]).history
    assert (h["step"] == 0.3).all() and (h["backtracks"] == 0).all() and (h["evals/fwdbwd"] == 1).all()
    assert "test/loss" not in h.columns  # xor: no test split
    assert h["loss_after"].isna().all()  # GD does not measure it; the next row's train/loss is it


def test_divergence_stops_at_that_epoch_with_nan_objective():
    r = run(["dataset=moons", "optimizer.lr=1e200", "trainer.max_epochs=50"])
    assert r.final["diverged_at"] is not None and r.final["diverged_at"] < 49
    assert len(r.history) == r.final["diverged_at"] + 1
    assert not math.isfinite(r.history["train/loss"].iloc[-1])
    assert math.isnan(r.final["objective"])


def test_stop_loss_stops_early():
    r = run(["dataset=moons", "optimizer=backtracking", "trainer.max_epochs=300", "trainer.stop_loss=0.2"])
    h = r.history
    assert h["train/loss"].iloc[-1] < 0.2 <= h["train/loss"].iloc[-2]
    assert len(h) < 300


def test_minibatch_sgd_reshuffles_and_counts_one_evaluation_per_batch():
    r = run(["dataset=moons", "optimizer=sgd", "optimizer.batch_size=100", "trainer.max_epochs=30"])
    h = r.history
    assert (h["evals/fwdbwd"] == 4).all()  # 400 training points / 100
    assert h["train/loss"].iloc[-1] < 0.6 * h["train/loss"].iloc[0]


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "lbfgs"])
def test_reference_optimizers_learn_moons(optimizer):
    r = run(["dataset=moons", f"optimizer={optimizer}", "trainer.max_epochs=100"])
    assert r.final["test/acc"] > 0.85, r.final
    if optimizer == "lbfgs":
        assert r.final["evals_fwdbwd"] > 100  # the strong-Wolfe search evaluates more than once


def test_digits_softmax_and_circles():
    digits = run(["dataset=digits", "model.width=32", "optimizer=adam", "trainer.max_epochs=60"])
    assert digits.config.model.head == "softmax" and digits.config.loss == "ce"
    assert digits.model.layers[-1][0].shape == (32, 10)
    assert digits.final["test/acc"] > 0.9
    circles = run(["dataset=circles", "optimizer=backtracking", "trainer.max_epochs=100"])
    assert circles.final["test/acc"] > 0.95


def test_zeros_init_keeps_hidden_units_identical():
    r = run(["dataset=moons", "init=zeros", "model.width=8", "trainer.max_epochs=50"])
    W1 = r.model.layers[0][0].detach()
    assert torch.equal(W1, W1[:, :1].expand_as(W1))  # symmetry is never broken


def test_float32_precision_and_dtype():
    r = run(["dataset=xor", "trainer.precision=32", "trainer.max_epochs=3"])
    assert r.model.layers[0][0].dtype == torch.float32
    assert run(["dataset=xor", "trainer.max_epochs=1"]).model.layers[0][0].dtype == torch.float64


def test_moons_lab_figures_fixed_lr_vs_backtracking():
    fixed = run([*MOONS_LAB_003, "optimizer=gd", "optimizer.lr=0.1"])
    assert fixed.final["train/acc"] == pytest.approx(0.865, abs=0.01)
    assert fixed.final["test/acc"] == pytest.approx(0.86, abs=0.01)
    armijo = run([*MOONS_LAB_003, "optimizer=backtracking", "optimizer.lr=1.0", "optimizer.c=1e-4",
                        "optimizer.beta=0.5", "optimizer.reset=initial",
                        "optimizer.on_failure=tiny_step"])  # fmt: skip
    assert armijo.final["test/acc"] == pytest.approx(0.98, abs=0.01)
    assert armijo.final["train/acc"] == pytest.approx(0.98, abs=0.01)


@pytest.mark.slow
def test_xor_relu_he_softmax_lab_figure():
    r = run([*XOR_LAB_002, "trainer.max_epochs=5000", "seed=2"])
    assert r.final["epochs"] == 5000
    assert r.final["train/loss"] <= 1e-3
    assert r.final["train/acc"] == 1.0


def test_gradient_reusing_armijo_costs_about_one_evaluation_per_step():
    lab = ["+experiment=lab_moons_backtracking"]
    classic = run(lab)
    reusing = run([*lab, "optimizer.trial_eval=forward_backward"])
    np.testing.assert_array_equal(reusing.history["train/loss"], classic.history["train/loss"])
    assert (
        classic.final["evals"] == 600 and reusing.final["evals"] == 301
    )  # the same path; one forward+backward per step, plus one at the start point
    gentle = run(
        [*lab, "optimizer.trial_eval=forward_backward", "optimizer.reset=grow", "optimizer.growth=1.1"]
    )
    h = gentle.history
    assert gentle.final["evals"] / gentle.final["epochs"] < 1.3
    assert gentle.final["train/loss"] < 0.05 < classic.final["train/loss"]
    np.testing.assert_array_equal(h["loss_after"].iloc[:-1], h["train/loss"].iloc[1:])  # rows start at w
    assert (h["evals/fwd"] == 0).all()


def test_the_decision_boundary_marks_exactly_the_misclassified_train_points(tmp_path):
    from gdlab.artifacts import misclassified, plot_decision_boundary

    r = run(["dataset=moons", "dataset.noise=0.3", "trainer.max_epochs=60"])
    wrong = misclassified(r.model, r.data.train)
    assert 0 < wrong.sum() == round((1 - r.final["train/acc"]) * len(wrong))
    assert plot_decision_boundary(r.model, r.data, tmp_path / "db.png").stat().st_size > 10_000
