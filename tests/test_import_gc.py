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


LATE_IMPORT = """
import gc, sys, threading
from gdlab import import_gc
{pause}import_gc.resume()  # a sweep's imports done, while MLflow's goes on in a thread (gdlab.stores)
frozen_at_resume = gc.get_freeze_count()
late = threading.Thread(target=lambda: __import__("mlflow"))
late.start()
late.join()
from gdlab.stores import mlflow_client
mlflow_client("sqlite:///" + sys.argv[1])  # the store open: what the late import made is frozen too
print(frozen_at_resume, gc.get_freeze_count(), gc.isenabled())
"""


def test_what_a_late_import_made_is_frozen_once_the_store_is_open(tmp_path):
    """MLflow imported in a thread past `resume` leaves ~600,000 objects that every full collection of the
    sweep would walk again: opening the store freezes them, in a command; a library user's collector is left
    alone."""
    counts = {}
    for command, pause in (("command", "import_gc.pause()\n"), ("library", "")):
        script = LATE_IMPORT.format(pause=pause)
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{command}.db")],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        at_resume, at_open, enabled = done.stdout.split()[-3:]
        counts[command] = (int(at_resume), int(at_open), enabled)
    at_resume, at_open, enabled = counts["command"]
    assert enabled == "True" and at_open - at_resume > 200_000  # MLflow's modules, out of the collections
    assert counts["library"] == (0, 0, "True")
