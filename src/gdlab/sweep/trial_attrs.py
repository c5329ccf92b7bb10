"""A batch's trials' user attributes, written in one transaction.

A population batch notes its runs and final metrics on each of its P trials (`trial.set_user_attr`): one
storage transaction, so one commit, per attribute and trial, 2P of them for a tracked batch (~2 ms each on
SQLite, more against a remote database). Where the study's storage is gdlab's OwnedTrialsStorage (Optuna's
RDB storage, on the versions it was proven on) they are written in one transaction by Optuna's own per-row
method; elsewhere, or if that transaction fails (nothing of it is written: a trial finished meanwhile by
another process's heartbeat), by `Trial.set_user_attr`, one by one, which raises where it always did, after
the trials before it are written. tests/test_owned_trials.py proves the trials equal through Optuna's API
either way.
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
