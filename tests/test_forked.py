"""gdlab.forked: work done in a forked child, its value (or error) back in the parent, and the fallbacks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gdlab.forked import Forked, in_parallel


def test_the_work_runs_in_another_process_and_its_value_comes_back():
    parent = os.getpid()
    forked = Forked(lambda: {"pid": os.getpid(), "values": list(range(5))})
    answer = forked.result()
    assert answer["pid"] != parent and answer["values"] == [0, 1, 2, 3, 4]


def test_the_works_error_is_raised_in_the_parent():
    def fails():
        raise ValueError("no such figure")

    with pytest.raises(ValueError, match="no such figure"):
        Forked(fails).result()


def test_a_child_killed_before_it_answers_leaves_the_work_to_the_parent(tmp_path: Path):
    started = tmp_path / "started"

    def work():
        if os.getpid() != parent:
            started.write_text("")
            time.sleep(60)  # killed here
        return os.getpid()

    parent = os.getpid()
    forked = Forked(work)
    while not started.exists():
        time.sleep(0.01)
    os.kill(forked.pid, signal.SIGKILL)
    assert forked.result() == parent


def test_a_child_never_runs_the_parents_exit_handlers(tmp_path: Path):
    marker = tmp_path / "exit-handler"

    def work():
        import atexit

        atexit.register(lambda: marker.write_text("ran"))
        return 1

    assert Forked(work).result() == 1
    assert not marker.exists()


def test_in_parallel_keeps_the_order_and_spreads_the_work_over_processes():
    values = in_parallel([lambda i=i: (i, os.getpid()) for i in range(7)], processes=3)
    assert [i for i, _ in values] == list(range(7))
    assert len({pid for _, pid in values}) == 3
    assert {pid for i, pid in values if i % 3 == 0} == {os.getpid()}  # the first share is done here


def test_cancel_stops_the_child(tmp_path: Path):
    forked = Forked(lambda: time.sleep(60))
    pid = forked.pid
    forked.cancel()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no such process


ORPHAN = """
import pathlib, shutil, signal, sys, time
from gdlab.forked import Forked
folder, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a host program's choice: the child must not die of it
def work():
    while not go.exists():
        time.sleep(0.01)
    (folder / "plot.png").write_text("drawn")
    return 1
forked = Forked(work, orphaned=lambda: shutil.rmtree(folder))
print(forked.pid, flush=True)
time.sleep(600)
"""


def test_a_child_whose_parent_was_killed_cleans_up_what_the_parent_would_have(tmp_path: Path):
    """kill -9 of the parent mid-work: the child finishes, finds nobody to answer, and runs `orphaned`
    (gdlab.sweep.study_plots removes its temporary folder so)."""
    folder, go = tmp_path / "plots", tmp_path / "go"
    folder.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN, str(folder), str(go)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    go.write_text("")  # the child draws only now, with its parent gone
    deadline = time.monotonic() + 120
    while has_not_exited(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not has_not_exited(child) and not folder.exists()


def has_not_exited(pid: int) -> bool:
    """Alive and not a zombie (the reparented child waits for its new parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_child_leaves_the_parents_objects_to_the_parent():
    """The parent's objects are frozen in the child (its collections never touch, so never copy, their
    pages) and not in the parent, whose collector goes on as before."""
    import gc

    assert gc.get_freeze_count() == 0
    frozen_in_child = Forked(gc.get_freeze_count).result()
    assert frozen_in_child > 10_000 and gc.get_freeze_count() == 0


CYCLE_AFTER_A_FORK = """
import gc, weakref
from gdlab import import_gc
from gdlab.forked import Forked
import_gc.pause(); import_gc.resume()  # a command: its imports frozen
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # garbage only the collector frees
alive = weakref.ref(a)
assert Forked(gc.get_freeze_count).result() > gc.get_freeze_count()  # the child froze the cycle too
del a, b
gc.collect()
print(alive() is None)
"""


def test_a_fork_leaves_the_parents_garbage_collectable():
    """In a command's process (its imports frozen) a cycle alive at a fork is freed once it is garbage."""
    done = subprocess.run([sys.executable, "-c", CYCLE_AFTER_A_FORK], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]
