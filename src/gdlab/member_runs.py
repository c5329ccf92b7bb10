"""A population's MLflow runs: made together before training, ended together when a batch stops early.

Each member's run is recorded by the metric writer (`MlflowRun(background=True)`), which also makes them
where it is at work on the store (gdlab.writer_calls). The first is created alone, so an unreachable store
stops the batch before anything else; the rest in one transaction where the store has a verified bulk path
(gdlab.run_store), else one by one. A run exists from the moment the store commits it, so each is held in
the batch's list from then on: a signal or an error before the batch is returned ends every run made
(`end_unclosed`), none stays RUNNING.
"""

from __future__ import annotations

import contextlib
import os

from gdlab.interrupts import deferred, interruption_reason
from gdlab.masking import error_line, mask_passwords
from gdlab.metric_writer import MetricWriter, RemoteError, WriterGone
from gdlab.tracking import (
    PARENT_ENV,
    MlflowRun,
    TrackingUnavailable,
    artifact_root,
    experiment_name,
    flatten,
    run_name,
    tags_of,
    tracking_uri,
)
from gdlab.writer_client import end_orphans


def create_member_runs(cfgs: list, overrides: list[list[str]], device: str,
                       extra_tags: list[dict | None]) -> list[MlflowRun]:  # fmt: skip
    """One run per member config, in order: made by the metric writer process where one is at work on the
    store (this process never imports MLflow for them), else here."""
    made = created_by_writer(cfgs, overrides, device, extra_tags)
    if made is not None:
        return made
    runs = [MlflowRun(cfgs[0], overrides[0], device, extra_tags=extra_tags[0], background=True)]
    try:
        create_rest(runs, cfgs[1:], overrides[1:], device, extra_tags[1:])
        return runs
    except BaseException as stop:  # a signal or a refusal meanwhile: no run made stays RUNNING
        with contextlib.suppress(Exception):
            end_unclosed(runs, stop, "before training")
        raise


def created_by_writer(cfgs: list, overrides: list[list[str]], device: str,
                      extra_tags: list[dict | None]) -> list[MlflowRun] | None:  # fmt: skip
    """The runs made by the writer process (gdlab.writer_calls.create_runs: the first alone, then the rest);
    None where no writer is at work on the store, or it died before answering."""
    uri = tracking_uri(cfgs[0])
    writer = MetricWriter.running(uri)
    if writer is None:
        return None
    parent = os.environ.get(PARENT_ENV)
    new_runs = [
        new_run(cfg, o, device, t, parent) for cfg, o, t in zip(cfgs, overrides, extra_tags, strict=True)
    ]
    experiment = None if parent else [experiment_name(cfgs[0]), artifact_root(cfgs[0], uri)]
    runs: list[MlflowRun] = []
    try:
        with deferred():  # a signal while the writer makes them comes once `runs` holds them
            made = writer.call("create_runs", runs=[list(new) for new in new_runs], experiment=experiment,
                               parent_run_id=parent)  # fmt: skip
            made_runs = zip(cfgs, overrides, made["run_ids"], new_runs, strict=False)  # the first ones made
            runs += [MlflowRun(cfg, o, device, background=True, created=(None, run_id, new.name, new.params))
                     for cfg, o, run_id, new in made_runs]  # fmt: skip
    except WriterGone:  # it may have made them: those end, and they are made again here
        end_orphans(uri, [new.name for new in new_runs])
        return None
    except RemoteError as error:  # the first run was refused: the store is out of reach
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking backend at {mask_passwords(uri)}: {error}"
        ) from error
    except BaseException as stop:
        with contextlib.suppress(Exception):
            end_unclosed(runs, stop, "before training")
        raise
    if made["error"] is not None:  # the store refused the rest: say so before any training
        refused = TrackingUnavailable(f"cannot create the population's runs at {mask_passwords(uri)}: "
                                      f"{made['error']}")  # fmt: skip
        with contextlib.suppress(Exception):
            end_unclosed(runs, refused, "before training")
        raise refused
    return runs


def new_run(cfg, overrides: list[str], device: str, extra_tags: dict | None, parent_run_id: str | None):
    """A member's run to create (gdlab.run_store.NewRun): its name, its tags, its params."""
    from gdlab.run_store import NewRun

    tags = tags_of(cfg, overrides, device, extra_tags, parent_run_id)
    return NewRun(tags.get("mlflow.runName") or run_name(cfg), tags, list(flatten(cfg).items()))


def create_rest(runs: list[MlflowRun], cfgs: list, overrides: list[list[str]], device: str,
                extra_tags: list[dict | None]) -> None:  # fmt: skip
    """Appends a run to `runs` for each config, each as soon as the store holds it."""
    from gdlab.run_store import create_runs

    first = runs[0]
    members = list(zip(cfgs, overrides, extra_tags, strict=True))
    new_runs = [new_run(cfg, o, device, t, first.parent_run_id) for cfg, o, t in members]
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
