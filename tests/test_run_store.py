"""Runs created in one transaction (gdlab.run_store) are what MlflowClient.create_run makes, read back through
MLflow's client, on SQLite and PostgreSQL; a population's tracked runs are created that way."""

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

import gdlab
from conftest import postgres_available
from gdlab.run_store import NewRun, create_runs, end_runs

TAGS = [{"dataset": "moons", "seed": str(i), "mlflow.user": "alice" if i % 2 else "bob",
         "mlflow.parentRunId": "p" * 32, "long": "x" * 5000} for i in range(5)]  # fmt: skip


PARAMS = [[("optimizer.lr", str(0.1 * i)), ("model.depth", "2"), ("long", "y" * 7000)] for i in range(5)]


def described(client: MlflowClient, run_id: str) -> dict:
    """Everything MLflow's client says of a run, with its own id in place of the id."""
    run = client.get_run(run_id)
    info = {key: getattr(run.info, key) for key in ("experiment_id", "run_name", "user_id", "status",
                                                     "lifecycle_stage", "end_time")}  # fmt: skip
    info["artifact_uri"] = run.info.artifact_uri.replace(run_id, "<id>")
    return {"info": info, "tags": run.data.tags, "params": run.data.params, "metrics": run.data.metrics}


def check_store(uri: str) -> None:
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("bulk-runs")
    names = [f"member-{i}" for i in range(len(TAGS))]
    one_by_one = [client.create_run(experiment_id, run_name=n, tags=t).info.run_id
                  for n, t in zip(names, TAGS, strict=True)]  # fmt: skip
    for run_id, params in zip(one_by_one, PARAMS, strict=True):
        client.log_batch(run_id, params=[Param(key, value) for key, value in params])
    together = create_runs(
        client, experiment_id, [NewRun(*run) for run in zip(names, TAGS, PARAMS, strict=True)]
    )
    assert together is not None and len(set(together)) == len(TAGS)
    for a, b in zip(one_by_one, together, strict=True):
        assert described(client, a) == described(client, b)
        assert client.get_run(b).info.start_time > 0
    found = client.search_runs([experiment_id], filter_string="tags.dataset = 'moons'", max_results=100)
    assert {r.info.run_id for r in found} == {*one_by_one, *together}
    client.log_metric(together[0], "loss", 0.5, step=1)  # a bulk-created run takes MLflow's own calls
    client.log_metric(one_by_one[0], "loss", 0.5, step=1)
    assert client.get_metric_history(together[0], "loss")[0].value == 0.5
    ends = [("FINISHED", 1_700_000_000_123), ("FAILED", 1_700_000_000_456), ("KILLED", 1_700_000_001_000)] * 2
    for run_id, (status, end_time) in zip(one_by_one, ends, strict=False):
        client.set_terminated(run_id, status, end_time=end_time)
    assert end_runs(client, [(run_id, *end) for run_id, end in zip(together, ends, strict=False)])
    for a, b in zip(one_by_one, together, strict=True):
        assert described(client, a) == described(client, b)
    assert [client.get_run(b).info.status for b in together] == ["FINISHED", "FAILED", "KILLED", "FINISHED",
                                                                 "FAILED"]  # fmt: skip
    with pytest.raises(MlflowException):  # an unknown run: MLflow's error, and nothing is ended
        end_runs(client, [(one_by_one[0], "FAILED", 1), ("f" * 32, "FAILED", 1)])
    client.delete_run(together[1])
    with pytest.raises(MlflowException, match="must be in the 'active' state"):  # as set_terminated refuses
        end_runs(client, [(together[1], "FINISHED", 1)])
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        client.set_terminated(together[1], "FINISHED")
    assert client.get_run(one_by_one[0]).info.status == "FINISHED"


def test_bulk_created_runs_equal_create_run_on_sqlite(tmp_path):
    check_store(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL at :5432")
def test_bulk_created_runs_equal_create_run_on_postgresql(make_database):
    check_store(f"postgresql+psycopg://postgres@127.0.0.1:5432/{make_database()}")


def test_a_tracked_population_creates_its_runs_together_and_records_each(tmp_path, clean_tracking_env):
    results = gdlab.run(["dataset=xor", "trainer.max_epochs=5", "tracking=local", f"tracking.dir={tmp_path}"],
                        population=[{"optimizer.lr": lr} for lr in (0.1, 0.2, 0.4)])  # fmt: skip
    client = MlflowClient(results[0].final["tracking_uri"])
    runs = [client.get_run(r.final["mlflow_run_id"]) for r in results]
    assert len({run.info.run_id for run in runs}) == 3
    for run, result in zip(runs, results, strict=True):
        assert run.info.status == "FINISHED"
        assert run.data.params["optimizer.lr"] == str(result.config.optimizer.lr)
        assert run.data.metrics["final/train/loss"] == pytest.approx(result.final["train/loss"])
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 5 + 1  # epochs, then final
        # the member's saved config, dumped from its plain sections, is the text of its full config
        saved = (Path(result.final["output_dir"]) / "config.yaml").read_text()
        assert saved == OmegaConf.to_yaml(result.config) and "lr: " + str(result.config.optimizer.lr) in saved
