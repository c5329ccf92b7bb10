"""gdlab-train as a user runs it: a subprocess with overrides."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gdlab
import warm

GDLAB_TRAIN = str(Path(sys.executable).with_name("gdlab-train"))


def train(*args, cwd):
    return warm.run([GDLAB_TRAIN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def parse_final(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("final: "))
    return {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", line)}


def test_cli_run_prints_the_numbers_gdlab_run_computes(tmp_path):
    overrides = ["dataset=moons", "optimizer=backtracking", "trainer.max_epochs=40", "backprop=manual",
                 "objective=test/acc", "direction=maximize"]  # fmt: skip
    proc = train(*overrides, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = gdlab.run(overrides).final
    printed = parse_final(proc.stdout)
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert printed[key] == pytest.approx(expected[key], rel=1e-5), key
    assert f"epochs=40 evals={expected['evals']} " in proc.stdout
    objective = re.search(r"objective test/acc \(maximize\) = (\S+)", proc.stdout)
    assert float(objective.group(1)) == pytest.approx(expected["test/acc"], rel=1e-5)
    saved = (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    assert "optimizer=backtracking" in saved


def test_bad_override_exits_non_zero_with_one_clear_message(tmp_path):
    proc = train("optimizer.lr=-0.5", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "gdlab-train: error: optimizer.lr=-0.5 is out of range; allowed: a number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "final:" not in proc.stdout  # nothing was trained


def test_unknown_group_option_lists_the_available_ones(tmp_path):
    proc = train("optimizer=rmsprop", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Could not find 'optimizer/rmsprop'" in proc.stderr
    for name in ("adam", "backtracking", "gd", "lbfgs", "momentum", "sgd"):
        assert f"\t{name}\n" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_dash_m_is_the_same_app(tmp_path):
    proc = warm.run(
        [sys.executable, "-m", "gdlab.train", "dataset=xor", "trainer.max_epochs=3",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "epochs=3 evals=3 " in proc.stdout


EXIT_SCRIPT = """
import concurrent.futures, sys, threading
from pathlib import Path
from gdlab.process_exit import exit_now

def command():
    pool = concurrent.futures.ThreadPoolExecutor(1)  # kept: its worker stays alive and idle
    print(pool.submit(sum, [1, 2]).result(), flush=True)
    command.pool = pool
    def slow_record():  # a non-daemon thread still writing when the command returns
        for i in range(200_000):
            pass
        Path(sys.argv[1]).write_text("complete")
    threading.Thread(target=slow_record).start()
    return 3

exit_now(command)
"""


def test_exit_now_joins_a_writing_thread_and_stops_idle_pool_workers(tmp_path):
    record = tmp_path / "record.txt"
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(record)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "3\n", "")
    assert record.read_text() == "complete"


ZYGOTE_CHILD = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "gdlab.writer_process"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"GDLAB_TEST_WHERE": "here"},
                         cwd=sys.argv[1])
with open(f"/proc/{child.pid}/stat") as stat:
    parent, group = stat.read().rsplit(")", 1)[1].split()[1:3]
_, err = child.communicate(timeout=300)
print(int(parent) == os.getpid(), int(group) == os.getpgrp(), child.returncode, err.decode().splitlines()[-1])
"""


def test_a_warm_commands_writer_is_its_own_child_with_what_popen_gave_it(tmp_path):
    """A warm-started command's metric writer comes from its zygote (tests/warm_server.py), not from a new
    interpreter: still the command's own child in its process group, waited for with its exit status,
    with the environment, folder and pipes Popen gave it (here no URI: it fails as a new interpreter does)."""
    script = tmp_path / "starts_a_writer.py"
    script.write_text(ZYGOTE_CHILD)
    (tmp_path / "there").mkdir()
    outputs = []
    for start, env in ((warm.run, {}), (warm.run, {"GDLAB_TEST_COLD_CHILDREN": "1"}), (subprocess.run, {})):
        done = start([sys.executable, str(script), str(tmp_path / "there")], capture_output=True, text=True,
                     cwd=tmp_path, env={**os.environ, **env}, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] == outputs[2] == "True True 1 KeyError: 'GDLAB_METRIC_WRITER_URI'\n"


def test_a_warm_started_command_is_the_command(tmp_path):
    """The suite's warm server (tests/warm.py) runs a command as the installed script does: the same output
    and exit status, in a process of its own session."""
    args = [GDLAB_TRAIN, "dataset=xor", "trainer.max_epochs=3", "tracking=none", "model.depth=oops"]
    cold = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    hot = warm.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert cold.returncode == 2 and "model.depth" in cold.stderr
    process = warm.Popen([GDLAB_TRAIN, "dataset=xor", "trainer.max_epochs=3", "tracking=none",
                          f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert os.getsid(process.pid) == process.pid  # its own session: a signal to its group reaches it alone
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    again = [*args[:-1], f"hydra.run.dir={tmp_path}/c"]
    assert parse_final(out) == parse_final(subprocess.run(again, capture_output=True, text=True, cwd=tmp_path,
                                                          timeout=300).stdout)  # fmt: skip
