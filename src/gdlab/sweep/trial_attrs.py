"""A batch's trials' user attributes, intermediate values and results (its tells), written in one transaction.

A population batch notes its runs and final metrics on each of its P trials (`trial.set_user_attr`), and
reports each trial's objective every few epochs (`trial.report`): one storage transaction, so one commit,
per attribute (or value) and trial, 2P of them for a tracked batch's notes and P at each report (~2 ms each
on SQLite, ~5 ms beside a tracked sweep's writer on a slow disk, more against a remote database). Where the
study's storage is gdlab's OwnedTrialsStorage (Optuna's RDB storage, on the versions it was proven on) they
are written in one transaction by Optuna's own per-row method; elsewhere, or if that transaction fails
(nothing of it is written: a trial finished meanwhile by another process's heartbeat), by Optuna's
`Trial.set_user_attr` and `Trial.report`, one by one, which raise where they always did.
tests/test_owned_trials.py proves the trials equal through Optuna's API either way.

Telling the batch's P trials (`study.tell`) costs P commits too, and two reads of each trial: at P = 1024 on
SQLite, 8 of a 5-epoch batch's 17 s. `tell_trials` runs Optuna's own tell for each trial inside
`OwnedTrialsStorage.tells_in_one_transaction`: the trials read in one query, their states and values
written in one commit. Optuna calls `sampler.after_trial` before each trial's write; that is done as the
trials are told, before the one write, so this is used only with samplers whose `after_trial` looks at
nothing but the trial it is given (`after_trial_is_local`).
"""

from __future__ import annotations

import optuna
from optuna.samplers import CmaEsSampler, GPSampler, QMCSampler, RandomSampler, TPESampler
from optuna.samplers._partial_fixed import PartialFixedSampler

from gdlab.interrupts import deferred
from gdlab.sweep.owned_trials import OwnedTrialsStorage


def tell_trials(study: optuna.Study, outcomes: list[tuple]) -> list[optuna.trial.FrozenTrial] | None:
    """`study.tell(trial, value, state=state, skip_if_finished=True)` for each (trial, value, state), the
    trials written in one transaction: the told trials, as study.tell returns them; None where the storage
    or the sampler does not allow it, or that transaction failed (nothing written: the caller tells each)."""
    from optuna.study._tell import _tell_with_warning

    storage = study._storage
    if len(outcomes) < 2 or not isinstance(storage, OwnedTrialsStorage):
        return None
    if not after_trial_is_local(study.sampler):
        return None
    ids = [trial._trial_id for trial, _, _ in outcomes]
    try:  # a signal meanwhile comes after (at P = 1024, ~1 s): it would cost the whole batch its results
        with deferred(), storage.tells_in_one_transaction(ids):
            for trial, value, state in outcomes:
                _tell_with_warning(study, trial, value, state, skip_if_finished=True)
    except Exception:  # nothing was written; each trial's own tell says what is wrong with it
        return None
    return storage.read_trials(ids)


def after_trial_is_local(sampler: optuna.samplers.BaseSampler) -> bool:
    """Whether `sampler.after_trial` reads nothing of the study (Optuna's own samplers, by their exact type:
    random; TPE, GP without constraints, QMC, CMA-ES and partial-fixed over such a sampler). Grid and
    brute-force samplers read the study's trials to decide whether to stop it; NSGA's may write to them."""
    kind = type(sampler)
    if kind is RandomSampler:
        return True
    if kind in (TPESampler, GPSampler) and getattr(sampler, "_constraints_func", True) is not None:
        return False
    inner = {TPESampler: "_random_sampler", GPSampler: "_independent_sampler",
             QMCSampler: "_independent_sampler", CmaEsSampler: "_independent_sampler",
             PartialFixedSampler: "_base_sampler"}.get(kind)  # fmt: skip
    return inner is not None and hasattr(sampler, inner) and after_trial_is_local(getattr(sampler, inner))


def set_user_attrs(study: optuna.Study, attrs_by_trial: dict[optuna.Trial, dict]) -> None:
    """`trial.set_user_attr(key, value)` for every trial's every attribute, in one transaction where the
    storage allows."""
    attrs_by_trial = {trial: attrs for trial, attrs in attrs_by_trial.items() if attrs}
    storage = study._storage
    if attrs_by_trial and isinstance(storage, OwnedTrialsStorage):
        try:
            storage.set_trials_user_attrs({trial._trial_id: attrs for trial, attrs in attrs_by_trial.items()})
        except Exception:  # nothing was written: each trial's own write says what is wrong with it
            pass
        else:
            for trial, attrs in attrs_by_trial.items():  # as Trial.set_user_attr keeps its own copy
                trial._cached_frozen_trial.user_attrs.update(attrs)
            return
    for trial, attrs in attrs_by_trial.items():
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


def report_values(study: optuna.Study, reports: dict[optuna.Trial, list[tuple[int, float]]]) -> set:
    """`trial.report(value, step)` for each trial's (step, value) pairs, in one transaction where the storage
    allows: the trials whose values it wrote. The others' are the caller's to report one by one, as Optuna
    says what is wrong with each (a step reported already, a trial finished meanwhile, a multi-objective
    study)."""
    storage = study._storage
    if not isinstance(storage, OwnedTrialsStorage) or len(study.directions) > 1:
        return set()
    fresh = {trial: [(int(step), float(value)) for step, value in pairs] for trial, pairs in reports.items()
             if pairs and all(0 <= step and step not in trial._cached_frozen_trial.intermediate_values
                              for step, _ in pairs)}  # fmt: skip
    if not fresh:
        return set()
    try:
        storage.set_trials_intermediate_values({trial._trial_id: pairs for trial, pairs in fresh.items()})
    except Exception:  # nothing was written
        return set()
    for trial, pairs in fresh.items():  # as Trial.report keeps its own copy
        trial._cached_frozen_trial.intermediate_values.update(pairs)
    return set(fresh)
