"""gdlab.import_gc: a command's collector paused while it imports, resumed (with its imports frozen) when
training starts; gdlab as a library leaves the collector alone."""

import gc
import subprocess
import sys

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
import gc, sys
from gdlab import import_gc
import_gc.pause()  # as the console script does
from gdlab.sweep.cli import main
status = main(["lr", "--population", "4", "--budget", "4", "--n-trials", "4", "--no-refit",
               "trainer.max_epochs=5", "tracking.dir=" + sys.argv[1]])
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # imported as the store was opened
print(status, gc.isenabled(), any(o is SqlAlchemyStore for o in gc.get_objects()))
"""


def test_a_tracked_sweep_freezes_mlflows_import_with_its_own(tmp_path):
    """MLflow is imported in a thread beside Lightning's, its SQL store when the parent run opens it: the
    sweep resumes its collector once its parent run is made, so MLflow's ~600,000 objects are frozen too (not
    walked by every full collection). `gc.get_objects()` lists only what collections still walk."""
    done = subprocess.run([sys.executable, "-c", SWEEP, str(tmp_path / "mlruns")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["0", "True", "False"]
