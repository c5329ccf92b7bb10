"""MLflow tracking: one run per training run, buffered metrics, artifacts (a sweep's parent run is
gdlab.sweep.parent_run's).

Everything goes through `mlflow.MlflowClient`. Per-epoch metrics are buffered and handed every
`flush_seconds` to the metric writer process (gdlab.metric_writer), which writes them with `log_batch`
(at most 1000 per call); the history is also kept in the run's local output directory, so a tracking
outage never loses a curve.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gdlab import system_metrics
from gdlab.data import SPLIT_METRICS
from gdlab.experiments import experiment_of_run, get_or_create_experiment
from gdlab.held_histories import forget
from gdlab.interrupts import deferred, interruption_reason
from gdlab.masking import error_line, mask_passwords
from gdlab.metric_store import log_metrics, log_params
from gdlab.metric_writer import MetricWriter, Outage, observe
from gdlab.repair import process_tags
from gdlab.stores import mlflow_client
from gdlab.version import __version__

PARENT_ENV = "GDLAB_MLFLOW_PARENT_RUN_ID"
MAX_PARAM_VAL_LENGTH = 6000  # MLflow's (mlflow.utils.validation's, tested equal), without importing MLflow
# A sweep's record (gdlab.sweep.selection, gdlab.sweep.refit), read back by gdlab-report:
ROLE_TAG, REFIT_ROLE = "gdlab.role", "refit"  # the refit of the chosen trial, a child of the parent run
SELECTED_ON_TAG = "gdlab.selected_on"  # on the parent: the split the trials were ranked on
RESULT_TAG = "result.summary"  # on the parent: the sweep's test result and how it was measured
OUTPUT_DIR_TAG = "gdlab.output_dir"  # a gdlab-train job's folder: its .hydra/ configs rebuild it (a refit)
# History columns not sent to MLflow as metrics: the epoch is the step, MLflow stamps each value with
# its wall time, and the other two repeat a logged one (train/loss, ls_failures).
UNLOGGED = frozenset({"epoch", "time", "loss_before", "ls_failed"})
# What a run logs as final/<metric> (gdlab-report's table, FINAL_TABLE_METRICS, is another list).
LOGGED_FINAL_METRICS = (*SPLIT_METRICS, "objective", "epochs", "evals", "wall_time", "rows/train", "rows/val",
                        "rows/test")  # fmt: skip
# Curves whose last point (step = epochs) is the final value, so a curve's latest value equals final/<key>.
CURVES_ENDING_AT_FINAL = frozenset(SPLIT_METRICS)
# Step-record values logged only when they change (GD's are constant): each MLflow row costs ~70 µs.
LOGGED_ON_CHANGE = frozenset({"trial_step", "step", "backtracks", "ls_failures", "evals/fwd", "evals/fwdbwd"})


def tracking_uri(cfg: DictConfig) -> str | None:
    """The MLflow tracking URI of a config (None: tracking off): a server's tracking.uri; a local one's
    MLFLOW_TRACKING_URI if set, else a SQLite store under tracking.dir (default mlruns/)."""
    backend = cfg.tracking.backend
    if backend == "none":
        return None
    if backend == "server":
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.tracking.dir).resolve() / 'mlflow.db'}"


def artifact_root(cfg: DictConfig, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: mlruns/artifacts/<experiment> for the embedded store."""
    if cfg.tracking.backend == "local" and uri.startswith("sqlite:"):
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name(cfg))
        return (Path(cfg.tracking.dir).resolve() / "artifacts" / folder).as_uri()
    return None  # a tracking server decides (its --default-artifact-root / --artifacts-destination)


def experiment_name(cfg: DictConfig) -> str:
    return cfg.tracking.get("experiment") or cfg.dataset.name


def run_name(cfg: DictConfig) -> str:
    """A name a person can read: moons-backtracking-d1-w16-lr1-s42."""
    width = cfg.model.width
    width = "x".join(map(str, width)) if isinstance(width, Iterable) and not isinstance(width, str) else width
    return (
        f"{cfg.dataset.name}-{cfg.optimizer.name}-d{cfg.model.depth}-w{width}"
        f"-lr{lr_label(cfg.optimizer)}-s{cfg.seed}" + ("-manual" if cfg.backprop == "manual" else "")
    )


def lr_label(optimizer: DictConfig) -> str:
    """The lr a name shows: 0.1; on an optimizer.lr_schedule, the lr it starts with and "sched" (6.35sched),
    so a replayed PBT schedule is not named after the fixed lr it never trained with."""
    schedule = optimizer.get("lr_schedule")
    if not schedule:
        return f"{optimizer.lr:g}"
    start = schedule[0][1] if schedule[0][0] == 0 else optimizer.lr
    return f"{start:g}sched"


def short_number(text) -> str:
    """A value with at most 3 significant digits (4.337920697490942 -> 4.34; 0.1, 1.0, words: unchanged)."""
    text = str(text)
    try:
        value = float(text)
    except ValueError:
        return text
    if text.lstrip("-").isdigit():  # a count or a width stays whole: 12345, not 1.23e+04
        return text
    digits = len(text.lstrip("-0.").replace(".", "").rstrip("0"))
    return f"{value:.3g}" if digits > 3 and math.isfinite(value) else text


def trial_run_name(params: dict, number: int, cfg: DictConfig) -> str:
    """A sweep trial's run name leads with what the sweep varies, where the UI's column shows it:
    lr=4.34 depth=2 #12 moons-gd-d2-w16-lr4.34-s42."""
    varied = " ".join(f"{key.rsplit('.', 1)[-1]}={short_number(value)}" for key, value in params.items())
    return f"{varied} #{number} {run_name(cfg)}".strip()


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as short dotted keys (optimizer.lr, model.depth, ...), values as MLflow params."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            text = mask_passwords(str(node))
            flat[prefix] = (
                text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            )

    container = dict(cfg) if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    walk(container, "")
    return flat


@functools.cache  # once per process: a sweep's runs all run the code this process imported
def git_state() -> tuple[str, str]:
    """(commit, dirty) of the gdlab checkout, or ('unknown', 'unknown') outside one."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
        return commit, str(bool(status.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def run_tags(cfg: DictConfig, overrides: list[str], device: str, extra: dict | None = None) -> dict[str, str]:
    import pytorch_lightning
    import torch

    commit, dirty = git_state()
    tags = {
        "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.name,
        "backprop": cfg.backprop,
        "init": cfg.init.name,
        "seed": str(cfg.seed),
        "device": device,
        "git.commit": commit,
        "git.dirty": dirty,
        "version.gdlab": __version__,
        "version.torch": torch.__version__,
        "version.lightning": pytorch_lightning.__version__,
        "overrides": mask_passwords(" ".join(overrides)),
        "mlflow.note.content": f"gdlab-train {mask_passwords(' '.join(overrides))}".strip(),
    }
    tags.update(process_tags())
    tags.update({k: mask_passwords(str(v)) for k, v in (extra or {}).items()})
    return tags


def tags_of(cfg, overrides: list[str], device: str, extra: dict | None, parent_run_id: str | None) -> dict:
    """A run's tags (`run_tags`), and its parent's id where it has one."""
    tags = run_tags(cfg, overrides, device, extra)
    if parent_run_id and "mlflow.parentRunId" not in tags:  # a member's trial run may be its parent
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


class TrackingUnavailable(RuntimeError):
    """The tracking backend cannot be reached when a run starts."""


class MlflowRun:
    """One training run in MLflow: created at construction, fed per epoch by `log_epoch`, closed by
    `close` and `wait`.

    Metric rows always go through the writer process (gdlab.metric_writer). A population member's
    run (`background=True`) hands the writer everything after its creation too: params, artifacts
    and its closing status, so the batch's training never waits on the store; `wait` collects the
    outcome. A single run logs those itself while the writer has been given nothing, so a short run never
    waits for the writer to start; once the writer is at work (a flush, a sweep's trials before a refit),
    the rest of the record goes to it too, on MLflow's bulk path.
    """

    def __init__(self, cfg: DictConfig, overrides: list[str], device: str = "cpu",
                 parent_run_id: str | None = None, extra_tags: dict | None = None,
                 background: bool = False, created: tuple[object, str, str, list] | None = None):  # fmt: skip
        """`created`: (client, run id, name, params) of a run made already with its params (flatten's
        items, gdlab.member_runs); else one is created."""
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.flush_seconds = float(cfg.tracking.get("flush_seconds", 1.0))
        self.drain_timeout = float(cfg.tracking.get("drain_timeout", 600.0))
        self.buffer: list = []
        self.last_flush: float | None = None  # set at the first epoch: a short run needs no writer
        self.outage: str | None = None
        self.waits = Outage()
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_ENV)
        self.background = background
        self.experiment_id: str | None = None  # known where this run was created here
        try:  # a signal (or an error) before the caller holds the run: end it here
            if created is None:
                self._create_run(tags_of(cfg, overrides, device, extra_tags, self.parent_run_id))
            else:
                client, self.run_id, self.name, self.params = created
                if client is not None:  # else opened where needed (`client`)
                    self.client = client
            self._start(background, created)
        except BaseException as stop:
            if getattr(self, "run_id", None):
                self._abandon(stop)
            raise

    @functools.cached_property
    def client(self):
        """Opened where first needed: a run the writer process made may never need it here."""
        return mlflow_client(self.uri)

    def _start(self, background: bool, created) -> None:
        # Started now, so its imports overlap Lightning's start-up; kept for the next runs (sweeps).
        self.writer = MetricWriter.for_uri(self.uri)
        self.submitted = False  # whether the writer holds anything of this run: then `wait` drains it
        self.closing: tuple[str, int] | None = None  # (status, end time in ms) once `close` has ended it
        self.last_values: dict = {}
        self.sent_tags: dict = {}  # tags handed to the writer: written again should it die
        self.writer_died = False  # the writer exited with some of this run's record in hand (see `rewrite`)
        self.inputs: tuple | None = None  # its datasets (gdlab.run_inputs.RunInputs, member), once logged
        self.final_logged = False  # whether `log_final` has buffered the result (once, before `close`)
        if created is None:
            self.params = list(flatten(self.cfg).items())
        if not background:
            self._call(log_params, self.client, self.run_id, self.params)
            system_metrics.start(self.cfg, self.uri, self.run_id)
        elif created is None:  # a run made by gdlab.member_runs got its params with it
            self._send({"params": self.params})

    def _abandon(self, stop: BaseException) -> None:
        """End a run whose start was interrupted: KILLED by a signal, else FAILED, with the reason."""
        by_signal = isinstance(stop, KeyboardInterrupt | SystemExit)
        reason = interruption_reason(stop) if by_signal else f"{type(stop).__name__}: {error_line(stop)}"
        with contextlib.suppress(Exception):
            system_metrics.stop(self.run_id)
            self.client.set_tag(self.run_id, "failure.reason", f"before training: {mask_passwords(reason)}")
        with contextlib.suppress(Exception):  # on its own: a tag that failed must not keep the run open
            self.client.set_terminated(self.run_id, status="KILLED" if by_signal else "FAILED")

    def _create_run(self, tags: dict) -> None:
        try:
            self.client = mlflow_client(self.uri)
            if self.parent_run_id:  # a trial lives in its sweep's experiment
                experiment_id = experiment_of_run(self.client, self.parent_run_id)
            else:
                experiment_id = get_or_create_experiment(
                    self.client, experiment_name(self.cfg), artifact_root(self.cfg, self.uri)
                )
            self.name = tags.get("mlflow.runName") or run_name(self.cfg)  # a sweep names its trials
            with deferred():  # a signal while MLflow makes it comes once its id is held, to end it
                self.run_id = self.client.create_run(experiment_id, run_name=self.name, tags=tags).info.run_id
            self.experiment_id = experiment_id
        except Exception as error:  # any transport or store error: refuse before training starts
            raise TrackingUnavailable(
                f"cannot reach the MLflow tracking backend at {mask_passwords(self.uri)}: {error_line(error)}"
            ) from error

    def _send(self, message: dict) -> None:
        self.writer.send({"run": self.run_id, **message})
        self.submitted = True

    def _call(self, method, *args, **kwargs) -> None:
        """A store call, an outage of the backend waited out for a while (gdlab.metric_writer.Outage); a
        failure then is this run's outage (its local outputs keep everything)."""
        try:
            self.waits.call(method, *args, **kwargs)
        except Exception as error:
            self.outage = self.outage or error_line(error)

    def log_epoch(self, row: dict) -> None:
        self.log_epoch_rows(row)
        now = time.monotonic()
        if self.last_flush is None:
            self.last_flush = now
        elif now - self.last_flush >= self.flush_seconds:
            self.flush()

    def log_final(self, final: dict) -> None:
        """The result at the trained weights (what gdlab-train returns) as final/<metric>, and as the last
        point of its curve: step k of a curve is measured at the weights after k steps (the history row of
        epoch k, taken before epoch k's step), so step `epochs` is the trained weights' value."""
        timestamp, step = int(time.time() * 1000), final["epochs"]
        self.final_logged = True
        for key in LOGGED_FINAL_METRICS:
            value = final.get(key)
            if isinstance(value, int | float) and not math.isnan(value):
                self.buffer.append((f"final/{key}", value, timestamp, step))
                if key in CURVES_ENDING_AT_FINAL:
                    self.buffer.append((key, value, timestamp, step))

    def write_final(self, final: dict) -> None:
        """`log_final`, in the store on return (what a model logged now links to, gdlab.logged_model): where
        the writer holds this run, handed to it and waited for; else logged here, as `close` would. Should the
        writer die with them, the final/<metric> rows are logged here (`rewrite` then writes the curves)."""
        start = len(self.buffer)
        self.log_final(final)
        finals = [row for row in self.buffer[start:] if row[0].startswith("final/")]
        if self.submitted or self.background or self.writer.used:
            self.flush()
            self.wait()
            if self.writer_died:  # no curve's last point: `rewrite` goes on after each one's last stored
                self._call(log_metrics, self.client, self.run_id, finals)
            return
        self._call(log_metrics, self.client, self.run_id, self.buffer)
        observe({"run": self.run_id, "metrics": self.buffer})
        self.buffer = []

    def flush(self) -> None:
        """Hand the buffered metrics to the writer process."""
        self.last_flush = time.monotonic()
        if self.buffer:
            self._send({"metrics": self.buffer})
            self.buffer = []

    def log_inputs(self, inputs, member: int) -> None:
        """The datasets of member `member` of `inputs` (gdlab.run_inputs.RunInputs): a member's made and
        logged by the writer (its rows sent once per set), a single run's made and logged now."""
        from gdlab.dataset_entities import dataset_inputs

        self.inputs = (inputs, member)
        if self.background:
            self.writer.send_rows(inputs.key(member), inputs.name, lambda: inputs.rows_of(member))
            self._send({"inputs_of": inputs.key(member)})
        else:
            self._call(self.client.log_inputs, self.run_id, dataset_inputs(inputs.of_member(member)))

    def set_tags(self, tags: dict) -> None:
        masked = [(key, mask_passwords(str(value))) for key, value in tags.items()]
        if self.submitted or self.background:
            self.sent_tags.update(masked)
            self._send({"tags": masked})
        else:
            from mlflow.entities import RunTag

            self._call(self.client.log_batch, self.run_id, tags=[RunTag(*tag) for tag in masked])

    def close(self, status: str, directory: Path | None, end_time: float | None = None) -> None:
        """Log the rest (buffered metrics, the files of `directory`), then end the run as FINISHED, FAILED
        or KILLED at `end_time` (time.time(); default now): a population member's own end, not its
        batch's. Where the writer holds this run, it does all that in order; `wait` for it."""
        end_ms = int((time.time() if end_time is None else end_time) * 1000)
        if not self.background:  # its last samples are written before it ends, however it ends
            self._call(system_metrics.stop, self.run_id)
        if self.submitted or self.background or self.writer.used:  # a writer at work already takes it all
            self.flush()
            if directory is not None:
                self._send({"artifacts": str(Path(directory).resolve())})
            with deferred():  # ended once: a signal here must not find it unclosed
                self._send({"end": status, "end_time": end_ms})
                self.closing = (status, end_ms)
            return
        self._call(log_metrics, self.client, self.run_id, self.buffer)
        observe({"run": self.run_id, "metrics": self.buffer})
        self.buffer = []
        if directory is not None:
            self._call(self.client.log_artifacts, self.run_id, str(directory))
        with deferred():
            self._call(self.client.set_terminated, self.run_id, status=status, end_time=end_ms)
            self.closing = (status, end_ms)

    def wait(self) -> str | None:
        """Wait until the writer has done everything handed to it for this run; the run's outage, if any."""
        if self.submitted:
            error = self.writer.drain(self.run_id, timeout=self.drain_timeout)
            self.submitted = False
            if error:  # its curves, should this process hold them, are read back from the store
                forget(self.run_id)
            if error and self.writer.process.poll() is not None:
                self.writer_died = True  # not an outage: the caller writes the record itself (`rewrite`)
            else:
                self.outage = self.outage or error
        return self.outage

    def rewrite(self, history: Iterable[dict], final: dict, directory: Path | None) -> None:
        """After the writer died with this run in hand (an OOM kill, a kill -9 of that child alone): write the
        run's record from this process, without the writer: params, the metric rows the store lacks (each
        metric from the step after the last one stored), tags, files; then end it as `close` was asked to. A
        record that cannot be completed ends the run FAILED, with the reason."""
        status, end_ms = self.closing or ("FAILED", int(time.time() * 1000))
        try:
            log_params(self.client, self.run_id, self.params)
            self.buffer, self.last_values = [], {}
            for row in history:
                self.log_epoch_rows(row)
            self.log_final(final)
            stored = self.stored_steps({key for key, *_ in self.buffer})
            log_metrics(self.client, self.run_id, [r for r in self.buffer if r[3] > stored.get(r[0], -1)])
            self.buffer = []
            from mlflow.entities import RunTag

            tags = {**self.sent_tags, "gdlab.writer": "died; the record was written by the training process"}
            self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
            if self.inputs and self.background:
                from gdlab.dataset_entities import dataset_inputs

                inputs, member = self.inputs
                self.client.log_inputs(
                    self.run_id, dataset_inputs(inputs.of_member(member))
                )  # MLflow skips a repeat
            if directory is not None:
                self.client.log_artifacts(self.run_id, str(directory))
        except Exception as error:  # the store is out of reach too: say so on the run, if it takes that
            self.outage = f"the metric writer died and its record could not be completed: {error}"
            status = "FAILED"
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, "failure.reason", mask_passwords(self.outage)[:5000])
        self._call(self.client.set_terminated, self.run_id, status=status, end_time=end_ms)

    def log_epoch_rows(self, row: dict) -> None:
        """`log_epoch`'s rows, buffered, without handing them to the writer."""
        step, timestamp = row["epoch"], int(time.time() * 1000)
        for key, value in row.items():
            if key in UNLOGGED or value != value:  # value != value: NaN, not logged
                continue
            if key in LOGGED_ON_CHANGE:
                if self.last_values.get(key) == value:
                    continue
                self.last_values[key] = value
            self.buffer.append((key, value, timestamp, step))

    def stored_steps(self, keys: set[str]) -> dict[str, int]:
        """The last step the store holds of each metric of this run (rows are written in step order)."""
        logged = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in keys if key in logged}  # fmt: skip
