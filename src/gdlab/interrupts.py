"""SIGTERM and SIGINT to a gdlab command: stop, leave every run (and trial) in a final state, exit 143/130.

systemd, docker and SLURM send SIGTERM to the whole process group, a terminal sends SIGINT (Ctrl-C). The
first one raises `Interrupted` wherever the command is; Lightning turns it into SystemExit inside a fit,
gdlab.fit closes that batch's runs KILLED, gdlab-sweep's trials layer tells Optuna FAIL and its CLI ends the
parent run KILLED; the command exits with 128 + the signal number. Later signals are ignored while that
cleanup runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

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


def interruption_reason(stop: BaseException) -> str:
    """Why a fit stopped, from what it raised: gdlab's `Interrupted`, Lightning's SIGTERMException, or a plain
    Ctrl-C, possibly under the SystemExit Lightning raises after shutting its loop down."""
    seen = stop
    while seen is not None:
        if isinstance(seen, Interrupted):
            return f"interrupted by {signal.Signals(seen.signum).name}"
        if type(seen).__name__ == "SIGTERMException":  # Lightning's, a SystemExit
            return "interrupted by SIGTERM"
        if isinstance(seen, KeyboardInterrupt):
            return "interrupted by SIGINT"
        seen = seen.__cause__ or seen.__context__
    return "interrupted"


def exit_code_of(stop: BaseException) -> int:
    """128 + the signal `stop` came from (`interruption_reason`'s rules): 143 for SIGTERM, 130 for SIGINT."""
    reason = interruption_reason(stop)
    return 128 + (signal.SIGTERM if reason.endswith("SIGTERM") else signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back until the block ends, then delivered to the handler that was in place.

    For work a signal must not cut in half: a store's transaction. The exception a handler raises inside
    one keeps its connection open, through the traceback, while the command's cleanup runs, and SQLite then
    refuses that cleanup's writes ("database is locked": a sweep's parent left RUNNING). Signals are handled
    in the main thread only; elsewhere, or where a handler was not set from Python, this holds nothing."""
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in before.values():
        yield
        return
    held: list[int] = []
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def held_for_children() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in this thread while it starts a child process that ignores them (the
    metric writer): the child inherits the mask, so a signal to the group during its interpreter's start-up
    waits until it has set them to be ignored (`ignore_here`) instead of killing it with a traceback. This
    process is not deprived of one: Python handles it as soon as another thread, or this one after the
    block, takes it. Where there are no signal masks (Windows), nothing is held."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_here() -> None:
    """This process ignores SIGTERM and SIGINT (those held since it started are dropped)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def whole(sessions):
    """A store's session factory (a context manager) whose sessions each run inside `deferred`: MLflow's
    `ManagedSessionMaker`, Optuna's `_create_scoped_session`."""
    if getattr(sessions, "whole", False):
        return sessions

    @contextlib.contextmanager
    def whole_session(*args, **kwargs):
        with deferred(), sessions(*args, **kwargs) as session:
            yield session

    whole_session.whole = True
    return whole_session


class PendingSigterm:
    """SIGTERM while a command starts (imports and composing take seconds on a busy machine): remembered
    instead of the default action's exit -15 with nothing said, and acted on once the command can: gdlab-sweep
    stops before any trial, gdlab-train delivers it again once Lightning's own handler is in place
    (`deliver`, from TrainingModule.on_train_start), so the run ends KILLED after its first epoch."""

    def __init__(self):
        self.signum: int | None = None
        self.installed = False

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum

    def install(self) -> PendingSigterm:
        signal.signal(signal.SIGTERM, self)
        self.installed = True
        return self

    def deliver(self) -> None:
        """Send a SIGTERM that arrived during start-up again, to whatever handles SIGTERM now."""
        if self.signum is not None and signal.getsignal(signal.SIGTERM) is not self:
            self.signum = None
            os.kill(os.getpid(), signal.SIGTERM)


PENDING = PendingSigterm()  # installed by the console scripts' first line (gdlab.entry)


def not_an_interrupt(record) -> bool:
    """A logging filter: drops Optuna's "Trial N failed ... KeyboardInterrupt" warning (with its traceback)
    after a signal."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))
