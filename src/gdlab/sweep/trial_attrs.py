"""A batch's trials' user attributes and intermediate values, written in one transaction.

A population batch notes its runs and final metrics on each of its P trials (`trial.set_user_attr`), and
reports each trial's objective every few epochs (`trial.report`): one storage transaction, so one commit,
per attribute (or value) and trial, 2P of them for a tracked batch's notes and P at each report (~2 ms each
on SQLite, ~5 ms beside a tracked sweep's writer on a slow disk, more against a remote database). Where the
study's storage is gdlab's OwnedTrialsStorage (Optuna's RDB storage, on the versions it was proven on) they
are written in one transaction by Optuna's own per-row method; elsewhere, or if that transaction fails
(nothing of it is written: a trial finished meanwhile by another process's heartbeat), by Optuna's
`Trial.set_user_attr` and `Trial.report`, one by one, which raise where they always did.
tests/test_owned_trials.py proves the trials equal through Optuna's API either way.
"""

from __future__ import annotations

import optuna

from gdlab.sweep.owned_trials import OwnedTrialsStorage


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
