"""Optuna's cached RDB storage, without re-reading the running trials this process asked.

Optuna wraps an RDBStorage in `_CachedStorage`, which re-reads every unfinished trial of the study, with
its params and attributes, whenever the trials are listed: at every `study.ask()`, every suggestion of a
model-based sampler and every pruning decision. A population batch keeps its P asked trials RUNNING while
it asks the next ones, so asking a batch reads O(P²) trials (at P = 1024 on SQLite, ~80 ms an ask: 85 s
to ask one batch). Here the trials this process created are "owned": while one stays RUNNING and this
process has not written to it since it was last read, the cached copy is current, and a listing's one small
query (ids and states) leaves it out: it skips the runs of consecutive owned ids that are still RUNNING, so
it returns only what changed. A write of ours marks a trial to be read again; a state that another process
set (a heartbeat's FAIL) is seen in the listing and read. Everything else is `_CachedStorage`'s.

This goes around Optuna's private storage classes, so it is used only where they are the ones it was
proven equal on (`supported`, tests/test_owned_trials.py: the same trials through Optuna's own storage),
and plain Optuna otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from datetime import datetime

import optuna
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.trial import TrialState

from gdlab.interrupts import deferred

# Runs of quiet ids a listing leaves out by their bounds; more (processes asking in turn), it lists them all.
# Each run is one more OR term, and SQLite refuses an expression more than 1000 deep.
MAX_QUIET_RUNS = 100
# Above every trial id (Optuna's schema makes them INTEGER, 32 bits on PostgreSQL): Optuna's _get_trials
# reads the ids it is given and any id above this, so none.
LARGEST_TRIAL_ID = 2**31 - 1
PROVEN_DATABASES = ("sqlite", "postgresql")  # MySQL's DATETIME drops the microseconds a cached copy keeps
PROVEN_ON = ("5.0.",)  # Optuna versions whose _CachedStorage and RDB schema this was proven equal on


def supported(backend: RDBStorage) -> bool:
    """Optuna's version and the database are ones this was proven on, with that version's schema."""
    try:
        proven = optuna.__version__.startswith(PROVEN_ON) and backend.engine.dialect.name in PROVEN_DATABASES
        return proven and backend.get_current_version() == backend.get_head_version()
    except Exception:  # a schema Optuna itself cannot read: leave it to Optuna to say so
        return False


def wrap(backend: RDBStorage):
    """The storage a sweep's study uses: OwnedTrialsStorage where supported, else Optuna's own."""
    return OwnedTrialsStorage(backend) if supported(backend) else backend


class OwnedTrialsStorage(_CachedStorage):
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._lock = threading.RLock()  # _CachedStorage's, re-entered here around its own reading
        self._owned: set[int] = set()  # trials this process created RUNNING and has not finished
        self._written: set[int] = set()  # owned trials written to since they were last read
        self._told: dict | None = None  # inside `tells_in_one_transaction`: trial id -> (state, values)
        self._read: dict = {}  # ... and the batch's trials as read when it began
        self._fresh: int | None = None  # the trial just created here, until it is first read

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial is None:  # a template's values are cached as given, not as stored (JSON): read them
            with self._lock:
                self._owned.add(trial_id)
                self._fresh = trial_id
        return trial_id

    def _wrote(self, trial_id: int) -> None:
        with self._lock:
            self._written.add(trial_id)
            self._fresh = None if self._fresh == trial_id else self._fresh

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._wrote(trial_id)

    def get_trial(self, trial_id: int):
        with self._lock:
            fresh, self._fresh = self._fresh, None
            if trial_id == fresh:  # study.ask's Trial reads back the trial it has just made: as it was made
                study_id, number = self._trial_id_to_study_id_and_number[trial_id]
                return copy.deepcopy(self._studies[study_id].trials[number])
        if self._told is not None and trial_id in self._read and trial_id not in self._told:
            return self._read[trial_id]  # read with the others, and not written to since
        return super().get_trial(trial_id)

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        if self._told is not None and trial_id in self._read and state.is_finished():
            self._told[trial_id] = (state, values)  # written with the others, at the end of the batch's tells
            return True
        try:
            if state == TrialState.RUNNING and values is None:  # an enqueued trial taken by `study.ask`
                return self._take_waiting(trial_id)
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            with self._lock:
                self._written.add(trial_id)
                self._fresh = None if self._fresh == trial_id else self._fresh
                if state.is_finished():
                    self._owned.discard(trial_id)

    def _take_waiting(self, trial_id: int) -> bool:
        """WAITING to RUNNING in one conditional UPDATE, with the start time RDBStorage writes; False where
        another process took the trial first. Optuna reads the state, then writes it (`SELECT ... FOR
        UPDATE`, which locks nothing on SQLite): two invocations asking together each took the same
        enqueued trial (a Sobol first batch) and trained it twice."""
        from optuna.storages._rdb import models

        trial, started = models.TrialModel, models.TrialModel()
        started.datetime_start = datetime.now()  # stored as Optuna's model stores it
        with self._one_transaction() as session:
            taken = (
                session.query(trial)
                .filter(trial.trial_id == trial_id, trial.state == TrialState.WAITING)
                .update(
                    {trial.state: TrialState.RUNNING, trial._datetime_start_utc: started._datetime_start_utc},
                    synchronize_session=False,
                )
            )
        return taken == 1

    def set_trial_intermediate_value(self, trial_id, step, intermediate_value) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._wrote(trial_id)

    def set_trial_user_attr(self, trial_id, key, value) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._wrote(trial_id)

    def set_trials_user_attrs(self, attrs_by_trial_id: dict[int, dict]) -> None:
        """`set_trial_user_attr` for every attribute of every trial, in one transaction (trial_attrs.py):
        Optuna's own per-row write, with its check that the trial is still running, then one commit."""
        from optuna.storages._rdb import models

        # Not ignoring an IntegrityError as Optuna's one-row write does: it would roll back every row silently
        with self._one_transaction() as session:
            for trial_id, attrs in attrs_by_trial_id.items():
                for key, value in attrs.items():
                    self._backend._set_trial_attr_without_commit(
                        session, models.TrialUserAttributeModel, trial_id, key, value
                    )
        for trial_id in attrs_by_trial_id:
            self._wrote(trial_id)

    def set_trials_intermediate_values(self, values_by_trial_id: dict[int, list[tuple[int, float]]]) -> None:
        """`set_trial_intermediate_value` for every (step, value) of every trial, in one transaction
        (trial_attrs.py): Optuna's own per-row write, with its check that the trial is still running."""
        with self._one_transaction() as session:
            for trial_id, values in values_by_trial_id.items():
                for step, value in values:
                    self._backend._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
        for trial_id in values_by_trial_id:
            self._wrote(trial_id)

    @contextlib.contextmanager
    def _one_transaction(self):
        """A transaction in a session of its own, committed at the end or rolled back whole. Not the thread's
        scoped session: Optuna's refusal to write to a finished trial reads the trial through that one, and
        its commit would commit the rows written before it (a batch half written). Signals wait for its end,
        as in the sweep's other Optuna sessions (gdlab.sweep.study, gdlab.interrupts)."""
        session = self._backend.scoped_session.session_factory()
        with deferred():
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    @contextlib.contextmanager
    def tells_in_one_transaction(self, trial_ids: list[int]):
        """Study.tell's reads and state writes of the trials `trial_ids` (RUNNING, this process's) inside the
        block: the trials read in one query, and the states and values told written in one transaction when
        it ends (Optuna's own checks and rows, as `set_trial_state_values` writes them). If that transaction
        fails, nothing of it is written and it raises (trial_attrs.tell_trials then tells one by one)."""
        self._read, self._told = dict(zip(trial_ids, self.read_trials(trial_ids), strict=True)), {}
        try:
            yield
            told = self._told
            with self._one_transaction() as session:
                for trial_id, (state, values) in told.items():
                    self._write_state_values(session, trial_id, state, values)
        finally:
            told, self._told, self._read = self._told, None, {}
        with self._lock:
            self._written.update(told)
            self._owned.difference_update(told)

    def read_trials(self, trial_ids: list[int]) -> list:
        """The trials `trial_ids` of one study, in that order, as `get_trial` reads each: in one query."""
        study_id = self._trial_id_to_study_id_and_number[trial_ids[0]][0]
        trials = self._backend._get_trials(study_id, states=None, included_trial_ids=set(trial_ids),
                                           trial_id_greater_than=LARGEST_TRIAL_ID)  # fmt: skip
        by_id = {trial._trial_id: trial for trial in trials}
        return [by_id[trial_id] for trial_id in trial_ids]

    def _write_state_values(self, session, trial_id: int, state: TrialState, values) -> None:
        """RDBStorage.set_trial_state_values's rows for a finished state, without its commit."""
        from optuna.storages._rdb import models

        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        self._backend.check_trial_is_updatable(trial_id, trial.state)
        for objective, value in enumerate(values or ()):
            self._backend._set_trial_value_without_commit(session, trial, objective, value)
        trial.state, trial.datetime_complete = state, datetime.now()

    def set_trial_system_attr(self, trial_id, key, value) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._wrote(trial_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            quiet = {trial_id for trial_id in self._owned if self._quiet(trial_id, study_id)}
            if not quiet:
                return super()._read_trials_from_remote_storage(study_id)
            listed = self._list_states(study_id, study, quiet)
            unchanged = quiet - {trial_id for trial_id, state in listed if state != TrialState.RUNNING}
            if not unchanged:
                return super()._read_trials_from_remote_storage(study_id)
            study.unfinished_trial_ids.update(unchanged)  # read again once they change
            last = max(max(trial_id for trial_id, _ in listed) if listed else -1, max(unchanged))
            reread = {trial_id for trial_id, _ in listed} - unchanged
            if not reread:  # nothing changed when the listing was made: Optuna's own read is that one moment
                return
            trials = self._backend._get_trials(study_id, states=None, included_trial_ids=reread,
                                               trial_id_greater_than=last)  # fmt: skip
            self._written.difference_update(trial._trial_id for trial in trials)
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:  # as _CachedStorage does with what it read
                if not trial.state.is_finished():
                    study.unfinished_trial_ids.add(trial._trial_id)
                    continue
                self._owned.discard(trial._trial_id)  # finished elsewhere (a heartbeat): no longer ours
                study.last_finished_trial_id = max(study.last_finished_trial_id, trial._trial_id)
                study.unfinished_trial_ids.discard(trial._trial_id)

    def _quiet(self, trial_id: int, study_id: int) -> bool:
        """An owned trial of `study_id` in the cache, not written to since it was read: the cached copy is
        current while it stays RUNNING."""
        cached = self._trial_id_to_study_id_and_number.get(trial_id)
        return cached is not None and cached[0] == study_id and trial_id not in self._written

    def _list_states(self, study_id: int, study: _StudyInfo, quiet: set[int]) -> list[tuple[int, TrialState]]:
        """(id, state) of the trials _CachedStorage would read (the unfinished, and any after the last
        finished one), except the `quiet` ones still RUNNING: those are current in the cache. Listing only
        what changed keeps an ask's query small while the batch's asked trials run (at P = 4096 on SQLite,
        listing them all was ~5 ms an ask)."""
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        table = models.TrialModel
        since = study.last_finished_trial_id
        earlier = [trial_id for trial_id in study.unfinished_trial_ids if trial_id <= since]
        where = table.trial_id > since
        if earlier:
            where = sqlalchemy.or_(where, table.trial_id.in_(earlier))
        runs = id_runs(quiet)  # a batch asked by one process: one run of consecutive ids, one pair of bounds
        if 0 < len(runs) <= MAX_QUIET_RUNS:
            quiet_ids = sqlalchemy.or_(*(table.trial_id.between(low, high) for low, high in runs))
            where = sqlalchemy.and_(where, sqlalchemy.not_(sqlalchemy.and_(
                quiet_ids, table.state == TrialState.RUNNING)))  # fmt: skip
        query = sqlalchemy.select(table.trial_id, table.state).where(table.study_id == study_id, where)
        with _create_scoped_session(self._backend.scoped_session) as session:
            return [(trial_id, TrialState(state)) for trial_id, state in session.execute(query)]


def id_runs(ids: set[int]) -> list[tuple[int, int]]:
    """`ids` as (first, last) of each run of consecutive ids: {3, 4, 5, 9} -> [(3, 5), (9, 9)]."""
    runs: list[list[int]] = []
    for trial_id in sorted(ids):
        if runs and trial_id == runs[-1][1] + 1:
            runs[-1][1] = trial_id
        else:
            runs.append([trial_id, trial_id])
    return [(first, last) for first, last in runs]
