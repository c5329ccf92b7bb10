"""The validation split: test rows that never move, three disjoint splits, val metrics everywhere."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import gdlab
import warm
from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.data import make_arrays, split_rows
from gdlab.fit import load_data
from gdlab.train import summary


def dataset_cfg(*overrides: str):
    return validate(compose_config([*overrides, "tracking=none"]))


def row_keys(X: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(X)}


@pytest.mark.parametrize("dataset", ["moons", "circles", "digits"])
def test_test_rows_are_the_same_with_and_without_a_validation_split(dataset):
    without = dataset_cfg(f"dataset={dataset}")
    with_val = dataset_cfg(f"dataset={dataset}", "dataset.val_size=0.2")
    X, y = make_arrays(without.dataset)
    train0, val0, test0 = split_rows(without.dataset, y)
    train1, val1, test1 = split_rows(with_val.dataset, y)
    assert len(val0) == 0 and np.array_equal(test0, test1)  # the same indices, in the same order
    assert sorted(train0) == sorted(np.concatenate([train1, val1]))  # val comes out of the old train rows
    n = len(y)
    assert len(val1) == int(np.ceil(0.2 * n)) and len(test1) == int(np.ceil(0.2 * n))
    everything = np.concatenate([train1, val1, test1])
    assert len(set(everything)) == len(everything) == n  # disjoint, and they cover the data


def test_the_test_rows_are_those_of_scikit_learns_split_of_the_arrays():
    from sklearn.model_selection import train_test_split

    cfg = dataset_cfg("dataset.val_size=0.25")
    X, y = make_arrays(cfg.dataset)
    _, X_test, _, y_test = train_test_split(X, y, test_size=cfg.dataset.test_size, random_state=42)
    _, _, test = split_rows(cfg.dataset, y)
    assert np.array_equal(X[test], X_test) and np.array_equal(y[test], y_test)


def test_standardization_statistics_come_from_the_training_rows_only():
    cfg = dataset_cfg("dataset=digits", "dataset.val_size=0.2")
    data = load_data(cfg)
    X, y = make_arrays(cfg.dataset)
    train, val, test = split_rows(cfg.dataset, y)
    mean, std = X[train].mean(0), X[train].std(0)
    std[std == 0] = 1.0  # StandardScaler leaves constant columns as they are
    np.testing.assert_allclose(data.train.X.numpy(), (X[train] - mean) / std, atol=1e-12)
    np.testing.assert_allclose(data.val.X.numpy(), (X[val] - mean) / std, atol=1e-12)
    np.testing.assert_allclose(data.test.X.numpy(), (X[test] - mean) / std, atol=1e-12)
    assert abs(data.train.X.numpy().mean(0)).max() < 1e-9  # centred on train, so val is not
    assert abs(data.val.X.numpy().mean(0)).max() > 1e-3


BAD = [
    (["dataset.val_size=-0.1"], "dataset.val_size=-0.1 is out of range; allowed: a number in [0, 1)"),
    (["dataset.val_size=nan"], "dataset.val_size=nan is not allowed; allowed: a finite number in [0, 1)"),
    (["dataset.val_size=inf"], "dataset.val_size=inf is not allowed"),
    (["dataset.val_size=0.8"], "dataset.val_size=0.8 with dataset.test_size=0.2 leaves no training rows"),
    (
        ["dataset=xor", "dataset.val_size=0.9"],
        "dataset.val_size=0.9 asks for 4 validation rows but dataset=xor has 4 rows outside its test split",
    ),
    (["dataset.val_size=x"], "dataset.val_size='x' must be a number"),
    (["objective=val/loss"], "objective='val/loss' needs a validation split but dataset.val_size=0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_validation_sizes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("+", r"\+")):  # fmt: skip
        validate(compose_config(overrides))


def test_gdlab_train_refuses_a_bad_val_size_in_one_line_with_exit_2(tmp_path):
    done = warm.run([str(Path(sys.executable).with_name("gdlab-train")), "dataset.val_size=1.5",
                           "tracking=none"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gdlab-train: error: dataset.val_size=1.5 is out of range; allowed: a number in [0, 1)"
    ]


def test_a_run_measures_val_each_epoch_and_at_the_end(tmp_path):
    r = gdlab.run(["dataset.val_size=0.2", "objective=val/loss", "trainer.max_epochs=30", "tracking=none"],
                  output_dir=tmp_path)  # fmt: skip
    assert {"val/loss", "val/acc", "test/loss", "test/acc"} <= set(r.history.columns)
    assert (len(r.data.train), len(r.data.val), len(r.data.test)) == (300, 100, 100)
    with torch.no_grad():
        Z = r.model(r.data.val.X)
        assert r.final["val/loss"] == pytest.approx(float(r.model.loss(Z, r.data.val.T)), abs=1e-12)
    assert r.final["objective"] == r.final["val/loss"]
    # epoch 0's row is measured at the initial weights, as test/loss is
    assert r.history["val/loss"].iloc[0] != r.history["test/loss"].iloc[0]
    saved = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert "val/loss" in saved and "val/acc" in saved
    assert "val/loss=" in summary(r).splitlines()[1]


def test_a_run_with_a_validation_split_and_no_test_split():
    r = gdlab.run(["dataset.val_size=0.2", "dataset.test_size=0", "objective=val/acc", "trainer.max_epochs=5",
                   "tracking=none"])  # fmt: skip
    assert r.data.test is None and len(r.data.val) == 100 and len(r.data.train) == 400
    assert "test/loss" not in r.history and "test/loss" not in r.final
    assert r.final["objective"] == r.final["val/acc"]


def test_population_members_measure_val_exactly_as_alone():
    base = ["dataset.val_size=0.2", "objective=val/loss", "trainer.max_epochs=15", "tracking=none"]
    members = gdlab.run(base, population=[{"optimizer.lr": lr} for lr in (0.05, 0.5)])
    alone = gdlab.run([*base, "optimizer.lr=0.5"])
    np.testing.assert_allclose(members[1].history["val/loss"], alone.history["val/loss"], rtol=0, atol=1e-10)
    assert members[1].final["val/acc"] == alone.final["val/acc"]


def test_a_saved_config_from_before_the_validation_split_still_validates():
    cfg = compose_config(["tracking=none"])
    container = OmegaConf.to_container(cfg)
    del container["dataset"]["val_size"]
    assert validate(OmegaConf.create(container)).dataset.val_size == 0.0
