"""A population's MLflow runs: made together before training, ended together when a batch stops early.

Each member's run is recorded by the metric writer (`MlflowRun(background=True)`). The first is created
alone, so an unreachable store stops the batch before anything else; the rest in one transaction where the
store has a verified bulk path (gdlab.run_store), else one by one. A run exists from the moment the store
commits it, so each is held in the batch's list from then on: a signal or an error before the batch is
returned ends every run made (`end_unclosed`), none stays RUNNING.
"""

from __future__ import annotations

import contextlib

from gdlab.interrupts import deferred, interruption_reason
from gdlab.masking import error_line, mask_passwords
from gdlab.tracking import MlflowRun, TrackingUnavailable, flatten, run_name, tags_of


def create_member_runs(cfgs: list, overrides: list[list[str]], device: str,
                       extra_tags: list[dict | None]) -> list[MlflowRun]:  # fmt: skip
    """One run per member config, in order."""
    runs = [MlflowRun(cfgs[0], overrides[0], device, extra_tags=extra_tags[0], background=True)]
    try:
        create_rest(runs, cfgs[1:], overrides[1:], device, extra_tags[1:])
        return runs
    except BaseException as stop:  # a signal or a refusal meanwhile: no run made stays RUNNING
        with contextlib.suppress(Exception):
            end_unclosed(runs, stop, "before training")
        raise


def create_rest(runs: list[MlflowRun], cfgs: list, overrides: list[list[str]], device: str,
                extra_tags: list[dict | None]) -> None:  # fmt: skip
    """Appends a run to `runs` for each config, each as soon as the store holds it."""
    from gdlab.run_store import NewRun, create_runs

    first = runs[0]
    members = list(zip(cfgs, overrides, extra_tags, strict=True))
    new_runs = []
    for cfg, o, t in members:
        tags = tags_of(cfg, o, device, t, first.parent_run_id)
        new_runs.append(NewRun(tags.get("mlflow.runName") or run_name(cfg), tags, list(flatten(cfg).items())))
    experiment_id = first.experiment_id  # made just now, alone, by MlflowRun
    try:
        with deferred():  # a signal while the store makes them comes once `runs` holds them
            run_ids = create_runs(first.client, experiment_id, new_runs) if new_runs else []
            if run_ids is not None:
                made = zip(members, run_ids, new_runs, strict=True)
                runs += [MlflowRun(cfg, o, device, background=True,
                                   created=(first.client, run_id, new.name, new.params))
                         for (cfg, o, _), run_id, new in made]  # fmt: skip
    except Exception as error:  # the store refused the batch: say so before any training
        raise TrackingUnavailable(
            f"cannot create the population's runs at {mask_passwords(first.uri)}: {error_line(error)}"
        ) from error
    if run_ids is None:  # no verified bulk path: one by one
        for cfg, o, t in members:
            runs.append(MlflowRun(cfg, o, device, extra_tags=t, background=True))


def end_unclosed(runs: list[MlflowRun | None], stop: BaseException, when: str) -> None:
    """The runs of a batch that stopped (a signal, an error) `when` ("before training", "while recording")
    they were closed: ended KILLED (a signal) or FAILED, with the reason, not left RUNNING. A member's run
    hands both to the writer, which ends the batch in one transaction."""
    signal = isinstance(stop, KeyboardInterrupt | SystemExit)
    why = interruption_reason(stop) if signal else f"{type(stop).__name__}: {error_line(stop)}"
    reason = f"{when}: {why}"
    status = "KILLED" if signal else "FAILED"
    ending = [run for run in runs if run is not None and run.closing is None]
    for run in ending:
        run.set_tags({"failure.reason": reason})
        run.close(status, None)
    for run in runs:
        if run is not None:
            run.wait()
    for run in ending:
        if run.writer_died:  # its end went down with the writer: written here
            with contextlib.suppress(Exception):
                run.client.set_tag(run.run_id, "failure.reason", reason)
                run.client.set_terminated(run.run_id, status=status)
