"""gdlab.sweep.owned_trials against Optuna's own storage: the same trials, asked, suggested, reported, pruned
and told in the same order, with another process failing and adding trials in between."""

import uuid
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from gdlab.members import Retire
from gdlab.sweep import owned_trials
from gdlab.sweep.pruning import EpochReports, PruningReporter
from gdlab.sweep.trial_attrs import after_trial_is_local, report_values, set_user_attrs, tell_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
SAMPLERS = {
    "random": lambda: optuna.samplers.RandomSampler(seed=3),
    "tpe": lambda: optuna.samplers.TPESampler(seed=3, n_startup_trials=4),  # multivariate, constant liar
    "qmc": lambda: optuna.samplers.QMCSampler(seed=3, warn_independent_sampling=False),
}


def suggest(trial) -> None:
    trial.suggest_float("lr", 1e-3, 10.0, log=True)
    trial.suggest_int("depth", 1, 4)
    trial.suggest_categorical("act", ["relu", "tanh"])


def objective(params: dict) -> float:
    return (params["lr"] - 0.1) ** 2 + 0.01 * params["depth"] + (params["act"] == "tanh") * 0.05


def summary(trial: optuna.trial.FrozenTrial) -> tuple:
    """Everything of a trial but its times (each database stamps its own)."""
    return trial.number, trial.state, trial.params, trial.values, trial.intermediate_values, trial.user_attrs


def snapshot(study: optuna.Study) -> list[tuple]:
    return [summary(trial) for trial in study.get_trials(deepcopy=False)]


def run_scenario(url: str, sampler: str, owned: bool) -> list:
    """Two batches of 10 asked before any is suggested (as gdlab-sweep's population mode asks them), pruning
    reports, a trial failed by another process's heartbeat and one it adds, then a third batch."""
    backend = optuna.storages.RDBStorage(url)
    storage = owned_trials.wrap(backend) if owned else backend
    assert isinstance(storage, owned_trials.OwnedTrialsStorage) == owned
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(storage=storage, sampler=SAMPLERS[sampler](), study_name="s", pruner=pruner)
    other = optuna.load_study(study_name="s", storage=url)  # another process on the same database
    seen = []
    for batch in range(3):
        trials = [study.ask() for _ in range(10)]
        for trial in trials:
            suggest(trial)
        notes = {trial: {"batch": batch, "final": {"val/loss": 0.1 * trial.number},
                         "mlflow_run_id": uuid.uuid5(uuid.NAMESPACE_OID, str(trial.number)).hex}
                 for trial in trials}  # fmt: skip
        if owned:  # a population batch's notes, in one transaction (gdlab.sweep.trial_attrs)
            set_user_attrs(study, notes)
        else:
            for trial, attrs in notes.items():
                for key, value in attrs.items():
                    trial.set_user_attr(key, value)
        seen.append([trial.user_attrs for trial in trials])  # each Trial's own copy, too
        seen.append(snapshot(study))
        if batch == 1:  # meanwhile, another process fails one of ours (a heartbeat) and adds a trial
            taken = other.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[3]
            other._storage.set_trial_state_values(taken._trial_id, TrialState.FAIL)
            other.add_trial(optuna.trial.create_trial(
                params={"lr": 0.1, "depth": 1, "act": "relu"}, value=0.01,
                distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 10.0, log=True),
                               "depth": optuna.distributions.IntDistribution(1, 4),
                               "act": optuna.distributions.CategoricalDistribution(["relu", "tanh"])},
            ))  # fmt: skip
            seen.append(snapshot(study))  # ours sees both at its next listing
        for step in range(3):
            running = [t for t in trials if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING]
            values = {trial: [(step, objective(trial.params) * (3 - step))] for trial in running}
            written = report_values(study, values) if owned else set()  # a batch's reports: one transaction
            assert written == (set(running) if owned else set())
            for trial in running:
                if trial not in written:
                    trial.report(*values[trial][0][::-1])
                if trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
        running = [t for t in trials if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING]
        outcomes = [(t, objective(t.params), None) for t in running]
        if len(running) > 2:  # a pruned trial and a NaN among them, as a batch's retired and diverged ones
            outcomes[0], outcomes[1] = (running[0], None, TrialState.PRUNED), (running[1], float("nan"), None)
        with warnings.catch_warnings():  # Optuna's, for the NaN: the trial FAILs
            warnings.simplefilter("ignore")
            told = tell_trials(study, outcomes) if owned else None  # a batch's tells: one transaction
            assert (told is not None) == (owned and len(outcomes) > 1)
            told = told or [study.tell(*outcome[:2], state=outcome[2], skip_if_finished=True)
                            for outcome in outcomes]  # fmt: skip
        seen.append([summary(trial) for trial in told])
        seen.append(snapshot(study))
    return seen


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_owned_trials_storage_gives_optunas_own_trials(tmp_path, sampler):
    plain = run_scenario(f"sqlite:///{tmp_path / 'plain.db'}", sampler, owned=False)
    owned = run_scenario(f"sqlite:///{tmp_path / 'owned.db'}", sampler, owned=True)
    assert owned == plain
    states = [state for _, state, *_ in plain[-1]]
    assert len(states) == 31 and states.count(TrialState.FAIL) >= 2  # 3 batches and the other's trial; the
    # heartbeat's FAIL and a NaN's
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states


def test_owned_trials_storage_on_postgresql(make_database):
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/{}"
    plain = run_scenario(url.format(make_database()), "tpe", owned=False)
    owned = run_scenario(url.format(make_database()), "tpe", owned=True)
    assert owned == plain


def interleaved(url: str, owned: bool) -> list:
    """Another process asks a trial between two of ours, then suggests and tells it while ours run."""
    backend = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=owned_trials.wrap(backend) if owned else backend, study_name="s")
    other = optuna.load_study(study_name="s", storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
    ours = [study.ask(), study.ask()]
    theirs = other.ask()
    ours += [study.ask(), study.ask()]
    assert ours[1].number < theirs.number < ours[2].number  # inside the ids of ours: not one run of them
    seen = [snapshot(study)]
    theirs.suggest_float("lr", 1e-3, 1.0, log=True)
    seen.append(snapshot(study))
    other.tell(theirs, 0.5)
    seen.append(snapshot(study))
    return seen


def test_another_processs_trial_among_ours_is_read_as_optuna_reads_it(tmp_path):
    assert interleaved(f"sqlite:///{tmp_path / 'owned.db'}", True) == interleaved(
        f"sqlite:///{tmp_path / 'plain.db'}", False
    )
    assert owned_trials.id_runs({3, 4, 5, 9, 11, 12}) == [(3, 5), (9, 9), (11, 12)]


def test_a_running_trial_of_ours_is_read_again_once_we_write_to_it_or_its_state_changes(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    other = optuna.load_study(study_name="s", storage=url)
    mine = study.ask()
    study.get_trials()  # read once
    other._storage.set_trial_user_attr(mine._trial_id, "note", "from elsewhere")
    cached = study.get_trials(deepcopy=False)[0]
    assert cached.user_attrs == {}  # not read again: nothing of ours changed it
    mine.set_user_attr("mine", 1)
    assert study.get_trials(deepcopy=False)[0].user_attrs == {"note": "from elsewhere", "mine": 1}
    other._storage.set_trial_user_attr(mine._trial_id, "note", "again")
    other._storage.set_trial_state_values(mine._trial_id, TrialState.FAIL)
    read = study.get_trials(deepcopy=False)[0]
    assert (read.state, read.user_attrs["note"]) == (TrialState.FAIL, "again")


def asked_counting_commits(url: str, n: int, writes: str = "INSERT INTO TRIAL_INTERMEDIATE_VALUES"):
    """An owned-trials study on `url` with `n` trials asked, its trials, and a list that gets an item per
    commit after: whether that commit ran a statement that starts with `writes`."""
    import sqlalchemy

    backend = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=owned_trials.wrap(backend), study_name="s")
    trials = [study.ask() for _ in range(n)]
    commits, wrote = [], [False]

    def statement(connection, cursor, sql, parameters, context, executemany) -> None:
        wrote[0] = wrote[0] or sql.lstrip().upper().startswith(writes)

    def commit(connection) -> None:
        commits.append(wrote[0])
        wrote[0] = False

    sqlalchemy.event.listen(backend.engine, "before_cursor_execute", statement)
    sqlalchemy.event.listen(backend.engine, "commit", commit)
    return study, trials, commits


def test_a_batchs_notes_are_one_commit(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, trials, commits = asked_counting_commits(url, 5)
    set_user_attrs(study, {trial: {"mlflow_run_id": str(trial.number), "final": {}} for trial in trials})
    assert len(commits) == 1  # Optuna's own path: 10
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.user_attrs for t in stored] == [{"mlflow_run_id": str(n), "final": {}} for n in range(5)]


def test_a_batch_with_a_trial_finished_elsewhere_fails_that_trial_as_optunas_own_writes_do(tmp_path):
    """One transaction for the batch cannot write to a trial another process finished meanwhile (a
    heartbeat): nothing of it is written, then the trials are written one by one by Optuna, and the finished
    one refuses as it always did, after the trials before it."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    trials = [study.ask() for _ in range(3)]
    other = optuna.load_study(study_name="s", storage=url)
    other._storage.set_trial_state_values(trials[1]._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(study, {trial: {"final": {"val/loss": float(trial.number)}} for trial in trials})
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.user_attrs for t in stored] == [{"final": {"val/loss": 0.0}}, {}, {}]


def reporters_at_epoch(study: optuna.Study, trials: list, epoch: int) -> list:
    """A batch's pruning reporters (gdlab.sweep.pruning) after each trial's one member logged its row of
    `epoch`: val/loss = the trial's number + 1; what each one's `epoch_end` did (None, or the Retire)."""
    reporters = [PruningReporter(trial, "val/loss", every=1) for trial in trials]
    batch = EpochReports(reporters)
    for reporter in reporters:
        reporter.batch = batch
        reporter.row_callback(0)({"val/loss": reporter.trial.number + 1.0})
    ended = []
    for reporter in reporters:  # as gdlab.module runs its group callbacks
        try:
            ended.append(reporter.epoch_end(epoch))
        except Retire as retire:
            ended.append(retire)
    return ended


def test_a_batchs_reports_of_an_epoch_are_one_commit(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, trials, commits = asked_counting_commits(url, 10)
    assert report_values(study, {trial: [(1, trial.number + 1.0)] for trial in trials[:5]}) == set(trials[:5])
    assert len(commits) == 1
    for trial in trials[5:]:
        trial.report(trial.number + 1.0, 1)
    assert len(commits) == 6  # Optuna's own path: one a trial
    before = len(commits)
    assert reporters_at_epoch(study, trials, 3) == [None] * 10  # as gdlab-sweep reports, pruner and all
    assert commits[before:].count(True) == 1  # every trial's value in one transaction (reads commit too)
    expected = [{1: n + 1.0, 3: n + 1.0} for n in range(10)]
    assert [t._cached_frozen_trial.intermediate_values for t in trials] == expected  # each Trial's copy
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.intermediate_values for t in stored] == expected


def test_a_batchs_reports_with_a_trial_finished_elsewhere_retire_that_trial_only(tmp_path):
    """The epoch's one transaction cannot write to a trial another process failed meanwhile (a heartbeat):
    nothing of it is written, each reporter reports through Optuna, and the failed trial's members retire."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    trials = [study.ask() for _ in range(3)]
    other = optuna.load_study(study_name="s", storage=url)
    other._storage.set_trial_state_values(trials[1]._trial_id, TrialState.FAIL)
    ended = reporters_at_epoch(study, trials, 2)
    assert ended[0] is None and ended[2] is None and "failed by heartbeat" in str(ended[1])
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.intermediate_values for t in stored] == [{2: 1.0}, {}, {2: 3.0}]


def test_another_optuna_version_or_schema_gets_optunas_own_storage(tmp_path, monkeypatch):
    backend = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")
    assert isinstance(owned_trials.wrap(backend), owned_trials.OwnedTrialsStorage)
    monkeypatch.setattr(optuna, "__version__", "6.0.0")
    assert owned_trials.wrap(backend) is backend


def test_a_batchs_tells_are_one_commit(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, trials, commits = asked_counting_commits(url, 6, writes="UPDATE TRIALS SET STATE")
    told = tell_trials(study, [(trial, trial.number / 10, None) for trial in trials])
    assert commits.count(True) == 1  # Optuna's own path: one a trial
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [(t.state, t.value) for t in told] == [(t.state, t.value) for t in stored]
    assert [(t.state, t.value) for t in stored] == [(TrialState.COMPLETE, n / 10) for n in range(6)]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_batchs_tells_with_a_trial_finished_elsewhere_meanwhile_write_nothing(
    tmp_path, monkeypatch, make_database, database
):
    """A heartbeat fails the third of the batch's trials as the batch's transaction begins to write: the
    first two are written in it, then Optuna's own check refuses the third, and the transaction writes
    nothing (not the rows before it: Optuna's check reads the trial in a session of its own) and says so
    (None); Optuna's own tells then skip that trial. (On SQLite, once the transaction has written, another
    process's write waits for its end.)"""
    url = (f"sqlite:///{tmp_path / 's.db'}" if database == "sqlite"
           else f"postgresql+psycopg://postgres@127.0.0.1:5432/{make_database()}")  # fmt: skip
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    trials = [study.ask() for _ in range(4)]
    other = optuna.load_study(study_name="s", storage=url)
    write = owned_trials.OwnedTrialsStorage._write_state_values

    def heartbeat_first(self, session, trial_id, state, values):
        if trial_id == trials[0]._trial_id:
            other._storage.set_trial_state_values(trials[2]._trial_id, TrialState.FAIL)
        write(self, session, trial_id, state, values)

    monkeypatch.setattr(owned_trials.OwnedTrialsStorage, "_write_state_values", heartbeat_first)
    assert tell_trials(study, [(trial, 1.0, None) for trial in trials]) is None
    stored = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.state for t in stored] == [TrialState.RUNNING] * 2 + [TrialState.FAIL, TrialState.RUNNING]
    monkeypatch.undo()
    for trial in trials:
        study.tell(trial, 1.0, skip_if_finished=True)
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]


def test_tells_go_together_only_where_the_samplers_after_trial_reads_nothing_of_the_study():
    samplers = optuna.samplers
    local = [samplers.RandomSampler(), samplers.TPESampler(), samplers.QMCSampler(), samplers.GPSampler(),
             samplers.TPESampler(multivariate=True, constant_liar=True)]  # fmt: skip
    reading = [samplers.GridSampler({"x": [1, 2]}), samplers.BruteForceSampler(), samplers.NSGAIISampler(),
               samplers.TPESampler(constraints_func=lambda trial: [0.0])]  # fmt: skip
    assert [after_trial_is_local(sampler) for sampler in local] == [True] * len(local)
    assert [after_trial_is_local(sampler) for sampler in reading] == [False] * len(reading)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_asked_trial_is_what_optuna_reads_back_without_reading_it(tmp_path, make_database, database):
    """study.ask's Trial reads back the trial just made: here, the copy made with it (no query), equal to
    what the database gives."""
    import sqlalchemy

    url = (f"sqlite:///{tmp_path / 's.db'}" if database == "sqlite"
           else f"postgresql+psycopg://postgres@127.0.0.1:5432/{make_database()}")  # fmt: skip
    backend = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=owned_trials.wrap(backend), study_name="s")
    study.ask()
    statements = []
    sqlalchemy.event.listen(backend.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    trial = study.ask()
    assert not [sql for sql in statements if "FROM trials" in sql and "trials.trial_id = " in sql]
    assert trial._cached_frozen_trial == optuna.storages.RDBStorage(url).get_trial(trial._trial_id)


def test_asks_interleaved_with_another_processs_go_on_past_the_listings_largest_exclusion(tmp_path):
    """Processes asking in turn make one run of ids per trial: a listing leaves out at most MAX_QUIET_RUNS of
    them (SQLite refuses an expression over 1000 deep), and lists everything past that."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    other = optuna.storages.RDBStorage(url)
    for _ in range(owned_trials.MAX_QUIET_RUNS + 2):  # each ask lists; the last ones past the bound
        study.ask()
        other.create_new_trial(study._study_id)
    assert len(owned_trials.id_runs(study._storage._owned)) == owned_trials.MAX_QUIET_RUNS + 2
    plain = optuna.load_study(study_name="s", storage=url)
    assert snapshot(study) == snapshot(plain) and len(snapshot(study)) == 2 * owned_trials.MAX_QUIET_RUNS + 4


def test_a_running_trial_added_from_a_template_is_read_as_stored(tmp_path):
    """A template's values are cached as given (a tuple, int keys) and stored as JSON: such a trial is not
    owned, so it is read back as Optuna's own storage reads it."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=owned_trials.wrap(optuna.storages.RDBStorage(url)), study_name="s")
    attrs = {"pair": (1, 2), "by": {3: 1}}
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs))
    study.ask()
    assert snapshot(study) == snapshot(optuna.load_study(study_name="s", storage=url))
    assert study.get_trials(deepcopy=False)[0].user_attrs == {"pair": [1, 2], "by": {"3": 1}}


TAKE_ENQUEUED = """
import sys, time
from pathlib import Path
import optuna
from gdlab.sweep import owned_trials
optuna.logging.set_verbosity(optuna.logging.WARNING)
engine = {"connect_args": {"timeout": 60}}
storage = owned_trials.wrap(optuna.storages.RDBStorage(sys.argv[1], engine_kwargs=engine))
study = optuna.load_study(study_name="s", storage=storage)
while not Path(sys.argv[2]).exists():  # both start asking together
    time.sleep(0.001)
print(" ".join(str(study.ask().number) for _ in range(int(sys.argv[3]))))
"""


def test_two_processes_asking_together_take_each_enqueued_trial_once(tmp_path):
    """Enqueued trials (a Sobol first batch) asked by two processes at once: each is taken by one of them.
    Optuna's own read-then-write (`SELECT ... FOR UPDATE` locks nothing on SQLite) let both take one."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    for x in range(40):
        study.enqueue_trial({"x": float(x)})
    go = tmp_path / "go"
    command = [sys.executable, "-c", TAKE_ENQUEUED, url, str(go), "20"]
    askers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    go.touch()
    taken = []
    for asker in askers:
        out, err = asker.communicate(timeout=300)
        assert asker.returncode == 0, err[-3000:]
        taken.append([int(number) for number in out.split()])
    assert len(taken[0]) == len(taken[1]) == 20
    assert sorted(taken[0] + taken[1]) == list(range(40))  # none taken twice, none left waiting
    states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
    assert set(states.values()) == {TrialState.RUNNING}


def test_an_enqueued_trial_taken_is_stored_as_optunas_own_storage_stores_it(tmp_path):
    """The conditional update that takes an enqueued trial writes what RDBStorage writes: its state and
    start time, read back through Optuna's own storage."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    taken = []
    for storage in (owned_trials.wrap(optuna.storages.RDBStorage(url)), optuna.storages.RDBStorage(url)):
        study = optuna.create_study(storage=storage, study_name=f"s{len(taken)}")
        study.enqueue_trial({"x": 0.5})
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        taken.append(optuna.storages.RDBStorage(url).get_trial(trial._trial_id))
    ours, optunas = taken
    assert (ours.state, ours.params) == (optunas.state, optunas.params) == (TrialState.RUNNING, {"x": 0.5})
    assert ours.system_attrs == optunas.system_attrs
    assert ours.datetime_start.tzinfo == optunas.datetime_start.tzinfo
    assert abs((ours.datetime_start - optunas.datetime_start).total_seconds()) < 60
