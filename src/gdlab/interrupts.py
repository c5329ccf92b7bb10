"""SIGTERM and SIGINT to a gdlab command: stop, leave every run (and trial) in a final state, exit 143/130.

systemd, docker and SLURM send SIGTERM to the whole process group, a terminal sends SIGINT (Ctrl-C). The
first one raises `Interrupted` wherever the command is; Lightning turns it into SystemExit inside a fit,
gdlab.fit closes that batch's runs KILLED, gdlab-sweep's trials layer tells Optuna FAIL and its CLI ends the
parent run KILLED; the command exits with 128 + the signal number. Later signals are ignored while that
cleanup runs.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Raised by the first SIGTERM/SIGINT. A KeyboardInterrupt, so Optuna's study.optimize fails the
    running trial and Lightning shuts its loop down as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptHandler:
    """Remembers the first signal and raises `Interrupted` once."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            return  # cleanup is running: let it finish
        self.signum = signum
        raise Interrupted(signum)

    def install(self, signals=SIGNALS) -> InterruptHandler:
        for signum in signals:
            signal.signal(signum, self)
        return self

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def failure_reason(handler: InterruptHandler) -> str:
    return f"interrupted by {handler.name or 'a signal'}"
