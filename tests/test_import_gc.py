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
