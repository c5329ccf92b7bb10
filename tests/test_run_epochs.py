"""A tracked population's curves reach MLflow in bulk (gdlab.run_epochs: one columnar message per flush) and
read back through MLflow's client exactly as the same members' curves logged row by row by single runs."""

from pathlib import Path

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


def test_each_members_appended_history_is_its_whole_history(tmp_path, clean_tracking_env):
    """Past MAX_OPEN_FILES members too: the files appended epoch by epoch are each member's history, read
    back equal, with no second copy written at the end."""
    from gdlab import artifacts

    lrs = [0.01 * (p + 1) for p in range(6)]
    original, artifacts.MAX_OPEN_FILES = artifacts.MAX_OPEN_FILES, 2  # members 2.. append and close each time
    try:
        results = gdlab.run(["dataset=xor", "trainer.max_epochs=15", "trainer.stop_loss=0.1",
                             "tracking=local", f"tracking.dir={tmp_path}", "tracking.plots=false"],
                            population=[{"optimizer.lr": lr} for lr in lrs])  # fmt: skip
    finally:
        artifacts.MAX_OPEN_FILES = original
    for result in results:
        saved = pd.read_csv(Path(result.final["output_dir"]) / "history.csv")
        pd.testing.assert_frame_equal(saved, result.history, check_dtype=False)
        assert len(saved) == result.final["epochs"]
    assert [p.name for p in tmp_path.rglob("*.new")] == []
