"""gdlab.import_gc: a command's collector paused while it imports, resumed (with its imports frozen) when
training starts; gdlab as a library leaves the collector alone."""

import gc
import json
import subprocess
import sys

import pytest

import gdlab

SHORT = ["dataset=moons", "trainer.max_epochs=3", "tracking=none"]

COMMAND = """
import gc, sys
from gdlab import import_gc
import_gc.pause()
import gdlab
paused = not gc.isenabled()
gdlab.run({short!r})
print(paused, gc.isenabled(), gc.get_freeze_count())
"""


def test_a_command_collects_again_from_its_training_on_with_its_imports_frozen(tmp_path):
    done = subprocess.run([sys.executable, "-c", COMMAND.format(short=SHORT)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    paused, enabled, frozen = done.stdout.split()[-3:]
    assert (paused, enabled) == ("True", "True") and int(frozen) > 100_000  # torch, Lightning, Hydra...


def test_gdlab_as_a_library_leaves_the_collector_alone():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gdlab.run(SHORT)
    assert gc.isenabled() and gc.get_freeze_count() == 0


SWEEP = """
import gc, json, sys
from gdlab import import_gc
import_gc.pause()  # as the console script does
from gdlab.sweep.cli import main
status = main(["lr", "--population", "4", "--budget", "4", "--n-trials", "4", "--no-refit",
               "trainer.max_epochs=5", "tracking.dir=" + sys.argv[1], *json.loads(sys.argv[2])])
imported = "mlflow" in sys.modules
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # imported as the store was opened
print(imported, status, gc.isenabled(), any(o is SqlAlchemyStore for o in gc.get_objects()))
"""


@pytest.mark.parametrize("worker", [False, True], ids=["invocation", "worker"])
def test_a_tracked_sweep_freezes_mlflows_import_with_its_own(tmp_path, worker):
    """An invocation never imports MLflow (its store work is the writer process's, gdlab.writer_calls). A
    worker (--workers, a launcher's job: --parent-run-id) imports MLflow's client and SQL store before it
    resumes its collector, so their ~600,000 objects are frozen too (not walked by every full collection).
    `gc.get_objects()` lists only what collections still walk."""
    options = []
    if worker:  # the parent run an invocation made, in another process
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        parent = client.create_run(client.create_experiment("sweep-lr")).info.run_id
        options = ["--worker", "--parent-run-id", parent]
    done = subprocess.run([sys.executable, "-c", SWEEP, str(tmp_path / "mlruns"), json.dumps(options)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported, *collected = done.stdout.split()[-4:]
    assert imported == str(worker)
    if worker:
        assert collected == ["0", "True", "False"]
    else:  # imported only now, by this test: not frozen, and the sweep's collector is on
        assert collected[:2] == ["0", "True"]
