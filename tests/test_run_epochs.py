"""A tracked population's curves reach MLflow in bulk (gdlab.run_epochs: one columnar message per flush) and
read back through MLflow's client exactly as the same members' curves logged row by row by single runs."""

import pandas as pd
import pytest
from mlflow import MlflowClient

import gdlab

LEARNING_RATES = (0.05, 0.5, 4.0)


def curves(client: MlflowClient, run_id: str) -> dict:
    """key -> [(step, value), ...] of every metric of a run, as MLflow's client reads it."""
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


@pytest.mark.parametrize("optimizer", ["gd", "backtracking"])
def test_population_curves_equal_single_runs_curves(tmp_path, clean_tracking_env, optimizer):
    base = ["dataset=xor", f"optimizer={optimizer}", "trainer.max_epochs=40", "tracking=local",
            f"tracking.dir={tmp_path}", "tracking.plots=false", "tracking.flush_seconds=0"]  # fmt: skip
    together = gdlab.run(base, population=[{"optimizer.lr": lr} for lr in LEARNING_RATES])
    alone = [gdlab.run([*base, f"optimizer.lr={lr}"]) for lr in LEARNING_RATES]
    client = MlflowClient(together[0].final["tracking_uri"])
    for member, single in zip(together, alone, strict=True):
        member_curves = curves(client, member.final["mlflow_run_id"])
        single_curves = curves(client, single.final["mlflow_run_id"])
        assert member_curves.keys() == single_curves.keys()
        assert len(member_curves["train/loss"]) == 40 + 1  # every epoch, then the final value
        for key, points in single_curves.items():
            if key == "final/wall_time":  # the population's, not comparable
                continue
            assert [step for step, _ in member_curves[key]] == [step for step, _ in points], key
            assert [value for _, value in member_curves[key]] == pytest.approx(
                [v for _, v in points], abs=1e-9
            )


def test_each_members_appended_history_is_its_whole_history_and_is_not_written_again(tmp_path):
    """Past MAX_OPEN_FILES members too: the file appended epoch by epoch is the member's history, read back
    equal, and is the same file at the end (a rewrite would replace it: a new inode)."""
    from gdlab import artifacts
    from gdlab.compose import compose_config
    from gdlab.config import validate
    from gdlab.fit import fit_population

    lrs = [0.01 * (p + 1) for p in range(6)]
    cfgs = [validate(compose_config(["dataset=xor", "trainer.max_epochs=15", "tracking=none",
                                     f"optimizer.lr={lr}"])) for lr in lrs]  # fmt: skip
    directories = [tmp_path / f"member-{p}" for p in range(len(lrs))]
    inodes: list[set] = [set() for _ in lrs]

    def watch(p):  # runs after the epoch's row was handed to the history files
        return lambda row: inodes[p].add((directories[p] / "history.csv").stat().st_ino)

    original, artifacts.MAX_OPEN_FILES = artifacts.MAX_OPEN_FILES, 2  # members 2..: rows wait, then append
    try:
        results = fit_population(cfgs, [[] for _ in lrs], directories, [[watch(p)] for p in range(len(lrs))])
    finally:
        artifacts.MAX_OPEN_FILES = original
    for p, result in enumerate(results):
        path = directories[p] / "history.csv"
        pd.testing.assert_frame_equal(pd.read_csv(path), result.history, check_dtype=False)
        assert len(result.history) == result.final["epochs"] == 15
        assert inodes[p] == {path.stat().st_ino}  # one file from the first epoch to the end
    assert [p.name for p in tmp_path.rglob("*.new")] == []
