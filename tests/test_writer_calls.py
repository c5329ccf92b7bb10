"""The store calls a tracked sweep hands the metric writer process (gdlab.writer_calls, through
gdlab.writer_client and gdlab.member_runs), and the refit's model logged by a forked child
(gdlab.model_logger): each gives what MLflow's own client gives, with the writer and, once it is gone,
without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from gdlab.metric_writer import MetricWriter, RemoteError
from gdlab.model import MLP
from gdlab.model_logger import ModelLogger
from gdlab.run_store import NewRun
from gdlab.writer_client import RunRecord, WriterClient, log_plain_batch

INFO = ("run_id", "run_name", "status", "experiment_id", "start_time", "end_time", "artifact_uri")


def as_fields(run) -> tuple:
    """What gdlab reads of a run (MLflow's Run or a RunRecord)."""
    return (tuple(getattr(run.info, name) for name in INFO), dict(run.data.params), dict(run.data.metrics),
            dict(run.data.tags))  # fmt: skip


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("calls")
    parent = client.create_run(experiment, run_name="parent").info.run_id
    children = []
    for i in range(3):
        run = client.create_run(experiment, run_name=f"child-{i}", tags={"mlflow.parentRunId": parent})
        client.log_batch(
            run.info.run_id,
            [
                mlflow.entities.Metric("train/loss", 1.0 / (i + step + 1), 1_700_000_000_000 + step, step)
                for step in range(4)
            ],  # fmt: skip
            [mlflow.entities.Param("optimizer.lr", str(10.0**-i))],
        )
        children.append(run.info.run_id)
    yield uri, client, experiment, parent, children
    writer = MetricWriter._instances.pop(uri, None)
    if writer is not None:
        writer.close()


def reads(client, experiment: str, parent: str, children: list[str]) -> tuple:
    """Everything a sweep's end reads, through `client`."""
    page = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip
    history = sorted(
        (m.step, m.timestamp, m.value) for m in client.get_metric_history(children[1], "train/loss")
    )
    return [as_fields(run) for run in page], page.token, as_fields(client.get_run(parent)), history


def test_the_writers_calls_read_what_mlflows_client_reads_and_write_what_it_writes(store):
    uri, client, experiment, parent, children = store
    MetricWriter.for_uri(uri)  # at work on the store, as in a tracked sweep
    proxy = WriterClient(uri)
    assert proxy.writer is not None
    expected = reads(client, experiment, parent, children)
    assert reads(proxy, experiment, parent, children) == expected
    assert all(isinstance(run, RunRecord) for run in proxy.search_runs([experiment]))

    log_plain_batch(proxy, parent, [("sweep/trials", 3, 1_700_000_000_000, 0)], [("objective", "val/loss")],
                    [("best.run_id", children[0])])  # fmt: skip
    proxy.set_tag(parent, "gdlab.ui_link", "http://x")
    proxy.set_experiment_tag(experiment, "mlflow.sharedViewState.k", "{}")
    proxy.set_terminated(parent, status="FINISHED", end_time=1_700_000_000_123)
    run = client.get_run(parent)
    assert run.data.metrics == {"sweep/trials": 3} and run.data.params == {"objective": "val/loss"}
    assert run.data.tags["best.run_id"] == children[0] and run.data.tags["gdlab.ui_link"] == "http://x"
    assert (run.info.status, run.info.end_time) == ("FINISHED", 1_700_000_000_123)
    assert client.get_experiment(experiment).tags["mlflow.sharedViewState.k"] == "{}"
    with pytest.raises(RemoteError, match="not found"):  # MLflow's own refusal, as one line
        proxy.get_run("0" * 32)

    # The writer gone (an OOM kill of that child alone): the same calls, made here, give the same.
    proxy.writer.process.kill()
    proxy.writer.process.wait()
    assert reads(proxy, experiment, parent, children) == reads(client, experiment, parent, children)
    assert proxy.writer is None
    proxy.set_terminated(children[2], status="KILLED")
    assert client.get_run(children[2]).info.status == "KILLED"


def test_runs_the_writer_makes_are_those_mlflows_client_makes(store):
    uri, client, experiment, parent, _ = store
    writer = MetricWriter.for_uri(uri)
    tags = {"gdlab.kind": "member", "mlflow.parentRunId": parent}
    new = [NewRun(f"member-{p}", {**tags, "mlflow.runName": f"member-{p}"}, [("optimizer.lr", str(p))])
           for p in range(5)]  # fmt: skip
    made = writer.call("create_runs", runs=[list(run) for run in new], parent_run_id=parent)
    assert made["error"] is None and made["experiment_id"] == experiment and len(made["run_ids"]) == 5
    for run_id, wanted in zip(made["run_ids"], new, strict=True):
        by_mlflow = client.create_run(experiment, run_name=wanted.name, tags=wanted.tags)
        client.log_batch(by_mlflow.info.run_id, params=[mlflow.entities.Param(*p) for p in wanted.params])
        ours, theirs = client.get_run(run_id), client.get_run(by_mlflow.info.run_id)
        assert (ours.info.run_name, ours.info.status, ours.info.experiment_id) == (
            theirs.info.run_name, theirs.info.status, theirs.info.experiment_id)  # fmt: skip
        assert ours.data.params == theirs.data.params
        mlflows_own = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"}
        assert {k: v for k, v in ours.data.tags.items() if k not in mlflows_own} == {
            k: v for k, v in theirs.data.tags.items() if k not in mlflows_own}  # fmt: skip
    # The rest refused (a param MLflow rejects): the first is made, and said; the caller ends it.
    bad = [new[0], NewRun("member-x", new[1].tags | {"mlflow.runName": "member-x"}, [("", "1")])]
    refused = writer.call("create_runs", runs=[list(run) for run in bad], parent_run_id=parent)
    assert len(refused["run_ids"]) == 1 and "param" in refused["error"].lower()
    # The first refused (no such parent): the store's error, raised where the caller waits.
    with pytest.raises(RemoteError):
        writer.call("create_runs", runs=[list(new[0])], parent_run_id="f" * 32)


def test_the_model_logger_logs_the_network_this_process_trained(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("models")).info.run_id
    torch.manual_seed(0)
    model = MLP([2, 8, 1], activation="tanh", head="sigmoid", loss="bce").double()
    X = np.random.default_rng(0).normal(size=(20, 2))
    ModelLogger.start()
    logger = ModelLogger.running()
    assert logger is not None and logger.pid != os.getpid()
    try:
        uri_logged, version = logger.log(uri, run_id, model, X, 7, None)
        assert version is None and uri_logged.startswith("models:/")
        mlflow.set_tracking_uri(uri)
        predicted = np.asarray(mlflow.pyfunc.load_model(uri_logged).predict(X)).reshape(len(X), -1)
        expected = model.predict_proba(torch.as_tensor(X)).numpy().reshape(len(X), -1)
        np.testing.assert_allclose(predicted, expected, rtol=1e-12)
        assert client.get_run(run_id).outputs.model_outputs[0].step == 7
        # The child gone (killed alone): the next model is logged by this process.
        os.kill(logger.pid, signal.SIGKILL)
        second, _ = logger.log(uri, run_id, model, X, 7, None)
        assert second != uri_logged and ModelLogger.running() is None
        assert len(client.get_run(run_id).outputs.model_outputs) == 2
    finally:
        mlflow.set_tracking_uri(None)
        if ModelLogger.running() is not None:
            ModelLogger.running().close()


def test_the_longest_param_value_is_mlflows():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from gdlab import tracking

    assert tracking.MAX_PARAM_VAL_LENGTH == MAX_PARAM_VAL_LENGTH


def test_a_tracked_sweeps_command_never_imports_mlflow_and_its_record_is_whole(tmp_path):
    """The speed of a tracked sweep rests on this (MLflow's import is ~0.7 s of the command's CPU): its
    store work is the writer process's, its refit's model a forked child's. Its record is whole all the
    same: the parent FINISHED with every trial and the refit as children, the refit's model logged."""
    notes = tmp_path / "imports.txt"
    guard = Path(__file__).parent / "import_guard"
    env = {**os.environ, "GDLAB_TEST_MLFLOW_IMPORTS": str(notes),
           "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(Path(sys.executable).parent / "gdlab-sweep"), "lr", "--population", "6", "--budget", "6",
               "--n-trials", "6", "trainer.max_epochs=20", f"tracking.dir={tmp_path / 'mlruns'}"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not notes.exists(), notes.read_text()[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`gdlab.kind` = 'sweep'")
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    refits = [run for run in children if run.data.tags.get("gdlab.role") == "refit"]
    assert parent.info.status == "FINISHED" and len(children) == 7 and len(refits) == 1
    assert {run.info.status for run in children} == {"FINISHED"}
    assert len(refits[0].outputs.model_outputs) == 1  # logged by the forked child
    assert parent.data.tags["result.run_id"] == refits[0].info.run_id
    assert parent.data.metrics["sweep/trials"] == 6 and "gdlab.ui_link" in parent.data.tags
    assert f"the chosen model: models:/{refits[0].outputs.model_outputs[0].model_id}" in done.stdout


def test_runs_a_dead_writer_may_have_made_end_and_leave_the_record(store):
    """The writer killed with a call that makes runs unanswered: what it made (this process's, RUNNING,
    named as asked) ends FAILED with the reason and is deleted, so the runs made again are the only ones;
    a run of another name, or of another process, is left alone."""
    from gdlab.repair import process_tags
    from gdlab.writer_client import end_orphans

    uri, client, experiment, parent, _ = store
    ours = process_tags()
    made = [client.create_run(experiment, run_name=name, tags=ours).info.run_id for name in ("t-1", "t-2")]
    held = client.create_run(experiment, run_name="sweep-parent", tags=ours).info.run_id
    another_host = {**ours, "gdlab.host": "elsewhere"}  # another process, not this host's to judge
    elsewhere = client.create_run(experiment, run_name="t-1", tags=another_host).info.run_id
    assert end_orphans(uri, ["t-1", "t-2", "t-3"]) == 2
    for run_id in made:
        run = client.get_run(run_id)
        assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "deleted")
        assert "died" in run.data.tags["failure.reason"]
    assert [client.get_run(run_id).info.status for run_id in (held, elsewhere)] == ["RUNNING", "RUNNING"]
    visible = {run.info.run_id for run in client.search_runs([experiment])}
    assert not visible & set(made) and {held, elsewhere} <= visible  # the report and the UI count them not
