"""gdlab-report on real runs in a real MLflow SQLite store: the tables, the files, the parent-run case."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import gdlab
import warm
from gdlab.report import TrackedRun, build_report
from gdlab.report.tables import make_final_table

GDLAB_REPORT = str(Path(sys.executable).with_name("gdlab-report"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS = 30
COMMON = ["dataset=moons", f"trainer.max_epochs={EPOCHS}"]
RUNS = {
    "optimizer.name=gd optimizer.lr=0.1": ["optimizer=gd", "optimizer.lr=0.1"],
    "optimizer.name=gd optimizer.lr=0.5": ["optimizer=gd", "optimizer.lr=0.5"],
    "optimizer.name=backtracking optimizer.lr=1.0": ["optimizer=backtracking"],
}  # the label each run should get: the params that differ between the three
FINAL_METRICS = ["train/loss", "train/acc", "test/loss", "test/acc", "evals/total"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh tracking directory, with neither MLflow's nor gdlab's environment variables leaking in."""
    torch.set_num_threads(1)  # as conftest does for each test; module fixtures run before its fixture
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("GDLAB_MLFLOW_PARENT_RUN_ID", raising=False)
        directory = tmp_path_factory.mktemp("tracking")
        yield directory, f"sqlite:///{directory / 'mlflow.db'}"


def train(directory: Path, experiment: str, overrides: list[str]) -> gdlab.RunResult:
    return gdlab.run([*COMMON, *overrides, f"tracking.dir={directory}", f"tracking.experiment={experiment}"])


def report_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return warm.run([GDLAB_REPORT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def lab(store, tmp_path_factory):
    """Three runs in experiment 'lab' and the report gdlab-report makes of them."""
    directory, uri = store
    results = {label: train(directory, "lab", overrides) for label, overrides in RUNS.items()}
    out = tmp_path_factory.mktemp("report") / "lab"
    proc = report_cli(
        "lab", "--tracking-uri", uri, "--out", str(out), "--epochs", "0,10,29,40", cwd=directory
    )
    return results, proc, out


def read_table(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, index_col="run")


def test_cli_exits_0_and_prints_both_tables(lab):
    results, proc, _ = lab
    assert proc.returncode == 0, proc.stderr
    assert "train loss and accuracy by epoch" in proc.stdout
    assert "final metrics, sorted by final/train/loss (minimize)" in proc.stdout
    for label in RUNS:
        assert proc.stdout.count(label) == 2, label  # one row in each table


def test_final_table_has_the_runs_last_logged_values_sorted_by_the_objective(lab):
    results, _, out = lab
    final = read_table(out, "final_metrics.csv")
    assert sorted(final.index) == sorted(RUNS)
    # gdlab's objective train/loss, minimize, at the trained weights (final/train/loss)
    assert final["final/train/loss"].is_monotonic_increasing
    for label, result in results.items():
        row = final.loc[label]
        for metric in ("train/loss", "train/acc", "test/loss", "test/acc"):
            # a curve's last point (step = epochs) is at the trained weights: result.final
            assert row[metric] == pytest.approx(result.final[metric], rel=1e-9), (label, metric)
        assert row["final/train/loss"] == pytest.approx(result.final["train/loss"], rel=1e-9)
        assert row["evals/total"] == result.final["evals"]
        assert row["epochs"] == result.final["epochs"] == EPOCHS


def test_epoch_table_matches_the_history_and_leaves_missing_epochs_blank(lab):
    results, _, out = lab
    table = read_table(out, "epoch_table.csv")
    assert list(table.columns) == [f"{metric}@{epoch}" for metric in ("train/loss", "train/acc")
                                   for epoch in (0, 10, 29, 40)]  # fmt: skip
    for label, result in results.items():
        for metric in ("train/loss", "train/acc"):
            assert table.loc[label, f"{metric}@10"] == pytest.approx(
                result.history[metric].iloc[10], rel=1e-9
            )
            assert table.loc[label, f"{metric}@29"] == pytest.approx(
                result.history[metric].iloc[29], rel=1e-9
            )
            assert pd.isna(table.loc[label, f"{metric}@40"])  # no run got that far


def test_labels_name_only_the_params_that_differ(lab):
    _, proc, out = lab
    labels = set(read_table(out, "final_metrics.csv").index)
    assert labels == set(RUNS)
    assert not any("seed=" in label or "dataset." in label for label in labels)


def test_report_files(lab):
    _, _, out = lab
    for name in ("loss_curves.png", "accuracy_curves.png", "loss_vs_evals.png"):  # optimizers differ
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
        assert f"]({name})" in (out / "report.md").read_text()
    markdown = (out / "report.md").read_text()
    final = read_table(out, "final_metrics.csv")
    for label, row in final.iterrows():
        assert f"| {label} | {row['train/loss']:.6g} | {row['train/acc']:.6g} |" in markdown
    header = (
        "| run | train/loss | train/acc | test/loss | test/acc | evals/total | final/train/loss | epochs |"
    )
    assert header in markdown


def test_unknown_target_is_one_clear_error(store, tmp_path):
    _, uri = store
    proc = report_cli(
        "no-such-experiment", "--tracking-uri", uri, "--out", str(tmp_path / "out"), cwd=tmp_path
    )
    assert proc.returncode == 2
    assert (
        "gdlab-report: error: 'no-such-experiment' is neither an experiment name nor a run id" in proc.stderr
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_corrupt_store_and_an_unwritable_out_are_one_line(store, lab, tmp_path):
    (tmp_path / "garbage.db").write_text("not a database")
    corrupt = report_cli("lab", "--tracking-uri", f"sqlite:///{tmp_path / 'garbage.db'}", cwd=tmp_path)
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert corrupt.stderr.strip().splitlines() == [
        f"gdlab-report: error: cannot open the MLflow store at sqlite:///{tmp_path / 'garbage.db'}: file is "
        "not a database"
    ]
    _, uri = store
    (tmp_path / "a-file").write_text("")
    unwritable = report_cli(
        "lab", "--tracking-uri", uri, "--out", str(tmp_path / "a-file" / "out"), cwd=tmp_path
    )
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    assert unwritable.stderr.strip().splitlines() == [
        f"gdlab-report: error: --out {tmp_path / 'a-file' / 'out'}: not a directory"
    ]


def test_missing_store_is_an_error_and_creates_nothing(tmp_path):
    proc = report_cli("lab", cwd=tmp_path)  # default store ./mlruns/mlflow.db does not exist here
    assert proc.returncode == 2 and "no MLflow store at sqlite:///" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlruns").exists()


def test_default_epochs_and_output_folder(lab, store, tmp_path, monkeypatch):
    _, uri = store
    monkeypatch.chdir(tmp_path)
    report = build_report("lab", tracking_uri=uri)
    assert list(report.epoch_table.columns[:4]) == [
        "train/loss@0",
        "train/loss@3",
        "train/loss@15",
        "train/loss@29",
    ]
    assert report.paths[0] == Path("reports/lab/report.md") and report.paths[0].is_file()
    assert report.parent_run_id is None and not report.logged_to_parent


def test_parent_run_report_covers_its_children_and_is_logged_to_it(store, tmp_path, monkeypatch):
    directory, uri = store
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        "sweep", artifact_location=(directory / "artifacts" / "sweep").as_uri()
    )
    parent_id = client.create_run(experiment_id, run_name="sweep").info.run_id
    monkeypatch.setenv("GDLAB_MLFLOW_PARENT_RUN_ID", parent_id)
    children = {train(directory, "sweep", ["optimizer.lr=0.1"]).final["mlflow_run_id"],
                train(directory, "sweep", ["optimizer.lr=0.5"]).final["mlflow_run_id"]}  # fmt: skip
    monkeypatch.delenv("GDLAB_MLFLOW_PARENT_RUN_ID")
    outsider = train(directory, "sweep", ["optimizer=backtracking"]).final["mlflow_run_id"]

    unlogged = build_report(parent_id, tracking_uri=uri, out=tmp_path / "unlogged", log=False)
    assert {run.run_id for run in unlogged.runs} == children
    assert client.list_artifacts(parent_id, "report") == []

    proc = report_cli(parent_id, "--tracking-uri", uri, "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = read_table(tmp_path / "sweep", "final_metrics.csv")
    assert sorted(final.index) == ["optimizer.lr=0.1", "optimizer.lr=0.5"]  # only the lr differs
    logged = {Path(f.path).name for f in client.list_artifacts(parent_id, "report")}
    assert {"report.md", "final_metrics.csv", "loss_curves.png", "accuracy_curves.png",
            "objective_vs_params.png"} <= logged  # fmt: skip
    assert "loss_vs_evals.png" not in logged  # GD spends one evaluation an epoch: the loss curves again

    # The experiment's report has the three training runs, not the parent run (it logs no metrics).
    whole = build_report("sweep", tracking_uri=uri, out=tmp_path / "experiment")
    assert {run.run_id for run in whole.runs} == children | {outsider}


def test_a_diverged_run_sorts_last_whatever_its_last_logged_loss():
    # NaN/inf are not logged: the diverged run's last train/loss is its (low) epoch-0 value.
    def tracked(label, losses, **outcome):
        curves = pd.DataFrame({"train/loss": losses, "evals/total": range(1, len(losses) + 1)})
        return TrackedRun(label, label, {}, curves, label=label, **outcome)

    runs = [tracked("diverged", [0.1], status="FAILED", diverged_at="1"), tracked("ok", [0.7, 0.5])]
    table = make_final_table(runs, "train/loss", "minimize")
    assert list(table.index) == ["ok", "diverged"]
    assert list(table["status"]) == ["FINISHED", "diverged at epoch 1"]
    assert list(table["epochs"]) == [2, 1] and "test/loss" not in table


def test_loss_against_evaluations_colours_by_rule_not_by_seed_or_lr():
    from gdlab.report import TrackedRun
    from gdlab.report.figures import rule_labels

    def run(**params):
        return TrackedRun(run_id="x", name="x", params=params, curves=pd.DataFrame())

    runs = [run(**{"optimizer.name": "gd", "optimizer.lr": "0.1", "seed": "1"}),
            run(**{"optimizer.name": "gd", "optimizer.lr": "5", "seed": "2"}),
            run(**{"optimizer.name": "backtracking", "optimizer.trial_eval": "forward", "seed": "1"}),
            run(**{"optimizer.name": "backtracking", "optimizer.trial_eval": "forward_backward"}),
            run(**{"optimizer.name": "polyak", "optimizer.c": "0.5", "seed": "3"})]  # fmt: skip
    assert rule_labels(runs) == ["gd", "gd", "backtracking trial_eval=forward",
                                 "backtracking trial_eval=forward_backward", "polyak"]  # fmt: skip


def test_sweep_figures_at_64_runs_colour_by_lr_mark_pruned_and_failed_and_survive_divergence(tmp_path):
    """The data behind each figure of a 64-run lr sweep: which runs, which scales, which marked how."""
    import numpy as np

    from gdlab.report.figures import write_figures
    from gdlab.report.tables import assign_labels, differing_params

    lrs = np.logspace(-3, 1, 64)
    runs = []
    for i, lr in enumerate(lrs):
        epochs = np.arange(31)
        loss = 0.7 * np.exp(-lr * epochs / 10) + 0.01 * (1 + abs(np.log10(lr) - 0.3))
        tags, status, diverged = {}, "FINISHED", None
        if i == 63:  # lr 10 diverges: its loss explodes, and it has no objective
            loss, status, diverged = 0.7 * 10.0 ** epochs[:12], "FAILED", "12"
        if i in (0, 1):  # the two smallest are pruned
            tags = {"optuna.state": "PRUNED"}
        spent = 1.0 + (epochs[: len(loss)] + i) % 3  # a line search's evaluations an epoch: 1 to 3
        curves = pd.DataFrame({"train/loss": loss, "train/acc": 1 - loss / 2, "evals/total": spent.cumsum()})
        latest = {"final/test/loss": float(loss[-1]), "final/epochs": len(loss) - 1}
        runs.append(TrackedRun(f"id{i}", f"run{i}", {"optimizer.lr": repr(float(lr)), "optimizer.name": "gd"},
                               curves, status, diverged, latest=latest, tags=tags))  # fmt: skip
    assign_labels(runs)
    assert runs[5].label == f"optimizer.lr={float(lrs[5]):.3g}"  # 3 significant digits, not 16
    from gdlab.tracking import short_number

    values = ("0.1", "1.0", "12345", "gd", "-3.14159")
    assert [short_number(v) for v in values] == ["0.1", "1.0", "12345", "gd", "-3.14"]
    drawn = write_figures(runs, tmp_path, differing_params(runs), "final/test/loss", "minimize")
    figures = {d.path.name: d for d in drawn}
    assert set(figures) == {"objective_vs_params.png", "loss_curves.png", "accuracy_curves.png",
                            "loss_vs_evals.png"}  # fmt: skip
    best = sorted(runs[2:63], key=lambda run: run.latest["final/test/loss"])[:5]
    by_param = figures["objective_vs_params.png"]
    assert by_param.xscale == "log" and by_param.top == [run.label for run in best]
    assert by_param.pruned == [runs[0].label, runs[1].label] and by_param.failed == [runs[63].label]
    curves = figures["loss_curves.png"]
    assert curves.colour_by == "optimizer.lr" and curves.yscale == "log" and len(curves.runs) == 64
    assert (curves.top, curves.pruned, curves.failed) == (by_param.top, by_param.pruned, by_param.failed)
    largest_start = max(float(run.curves["train/loss"].iloc[0]) for run in runs)
    assert curves.ylim[1] == pytest.approx(2 * largest_start)  # not the diverged run's 7e11
    for drawn in figures.values():
        data = drawn.path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    from gdlab.report.rank_labels import overlaps

    for name in ("objective_vs_params.png", "loss_curves.png"):  # the top 5 are neighbours: close points
        (boxes,) = figures[name].rank_labels
        assert len(boxes) == 5
        assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), name
    for run in runs:  # two evaluations every epoch: loss against evaluations is the loss curves again
        run.curves["evals/total"] = 2.0 * (run.curves.index + 1)
    (tmp_path / "again").mkdir()
    again = write_figures(runs, tmp_path / "again", differing_params(runs), "final/test/loss", "minimize")
    assert {d.path.name for d in again} == set(figures) - {"loss_vs_evals.png"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", __import__("gdlab.sweep.spec", fromlist=["available_sweeps"]).available_sweeps()
)
def test_every_shipped_sweeps_parent_gets_its_report(tmp_path, name):
    """A tiny run of each shipped sweep: its parent run holds the comparison report (a parameter that only
    some runs have, init.std in init_activation, once cost the whole report)."""
    trials = 18 if name == "init_activation" else 3  # its whole grid: more runs than a figure's legend takes
    command = [str(Path(sys.executable).parent / "gdlab-sweep"), name, f"hydra.sweeper.n_trials={trials}",
               "trainer.max_epochs=5", "--no-refit", "--progress", "0"]  # fmt: skip
    done = warm.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no sweep report" not in done.stdout + done.stderr, done.stdout[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`gdlab.kind` = 'sweep'")
    report = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "objective_vs_params.png", "loss_curves.png"} <= report, report


def test_a_mixed_experiment_is_labelled_by_run_names_and_its_runs_without_the_objective_are_not_failed(
    tmp_path,
):
    """The labs' kind of experiment: runs that differ in many params, some without the objective's metric."""
    from gdlab.report.figures import write_figures
    from gdlab.report.tables import assign_labels, differing_params

    def run(i: int, params: dict, latest: dict) -> TrackedRun:
        curves = pd.DataFrame({"train/loss": [0.7, 0.5, 0.4], "train/acc": [0.5, 0.7, 0.8]})
        return TrackedRun(f"id{i}", f"moons-gd-d{i}-w16-lr0.1-s42", params, curves, "FINISHED", None,
                          latest={"final/train/loss": 0.4, **latest})  # fmt: skip

    many = {
        "dataset.name": "moons",
        "model.depth": "1",
        "model.width": "16",
        "optimizer.lr": "0.1",
        "seed": "1",
    }
    varied = [{"model.depth": str(i), "seed": str(i), "optimizer.lr": str(i / 10), "model.width": str(8 * i),
               "init.name": f"i{i}"} for i in range(4)]  # fmt: skip
    runs = [run(i, {**many, **varied[i]}, {"final/val/loss": 0.3 + i / 100} if i else {}) for i in range(4)]
    assign_labels(runs)
    assert [r.label for r in runs] == [r.name for r in runs]  # 5 params differ: the names say it shortest
    figures = {d.path.name: d for d in write_figures(runs, tmp_path, differing_params(runs), "final/val/loss",
                                                     "minimize")}  # fmt: skip
    by_param = figures["objective_vs_params.png"]
    assert by_param.no_objective == [runs[0].label] and by_param.failed == []
    assert by_param.legend == ["finished", "no objective", "top 3 (minimize)"]  # no "pruned", no "failed"
