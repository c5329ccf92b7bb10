"""On PYTHONPATH for tests/test_writer_calls.py: notes, in $GDLAB_TEST_MLFLOW_IMPORTS, where a gdlab-sweep
command's own process (not its forked children, not the metric writer) first imports MLflow."""

import os
import sys
import traceback

if os.environ.get("GDLAB_TEST_MLFLOW_IMPORTS") and sys.argv and sys.argv[0].endswith("gdlab-sweep"):
    _PID = os.getpid()

    class _Guard:
        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" and os.getpid() == _PID:
                with open(os.environ["GDLAB_TEST_MLFLOW_IMPORTS"], "a") as notes:
                    notes.write("".join(traceback.format_stack()) + "\n")
            return None  # the import itself goes on, by the usual finders

    sys.meta_path.insert(0, _Guard())
