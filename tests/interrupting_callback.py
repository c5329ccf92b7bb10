"""A Hydra callback for tests/test_record.py: a Ctrl-C between two jobs of a multirun, outside either job."""

import os
import signal

from hydra.experimental.callback import Callback


class SigintAfterFirstJob(Callback):
    def on_job_end(self, config, job_return, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGINT)
