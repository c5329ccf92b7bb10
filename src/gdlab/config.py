"""Check a composed config before any work starts, and fill in its `auto` values.

Each problem raises one `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from gdlab.data import N_CLASSES
from gdlab.masking import mask_passwords
from gdlab.memory import available_memory, dataset_rows, describe_bytes, memory_needed
from gdlab.model import ACTIVATIONS, HEADS, INITS, LOSS_FOR_HEAD, LOSSES
from gdlab.optimizers import FAILURE_MODES, OPTIMIZERS, RESETS, TRIAL_EVALS
from gdlab.schedules import SCHEDULABLE, SCHEDULE_SUFFIX
from gdlab.step_rules import BB_VARIANTS, FIRST_TRIALS

BACKPROPS = ("autograd", "manual")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = (32, 64)
DIRECTIONS = ("minimize", "maximize")
TRACKING_BACKENDS = ("local", "server", "none")
TRAIN_METRICS = ("train/loss", "train/acc")
VAL_METRICS = ("val/loss", "val/acc")
TEST_METRICS = ("test/loss", "test/acc")
MAX_SEED = 2**32 - 1  # numpy's limit (torch takes more)
MAX_NOISE = 100.0  # the datasets live on a unit scale: past this the points are noise, and 1e308 overflows
MAX_NAME = 200  # an experiment's name becomes a folder name under mlruns/artifacts/ (255 bytes at most)


class ConfigError(ValueError):
    """A config value outside what gdlab accepts."""


def _allowed(values) -> str:
    return "|".join(str(v) for v in values)


class Sections(dict):
    """Plain config sections (nested dicts) read as a DictConfig is: `view.optimizer.lr`, `view.get(k)`;
    what `check_member` checks a population member's own values on, without making a DictConfig."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Sections(value) if isinstance(value, dict) else value


def select(cfg, key: str):
    """OmegaConf.select for a DictConfig, and the same walk through plain `Sections`."""
    if not isinstance(cfg, Sections):
        return OmegaConf.select(cfg, key)
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def check_choice(cfg, key: str, allowed) -> None:
    value = select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {_allowed(allowed)}")


def check_number(cfg, key: str, low=None, high=None, *, low_open=False, high_open=False,
                 integer=False, optional=False) -> None:  # fmt: skip
    value = select(cfg, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not is_number:
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if isinstance(value, float) and not math.isfinite(value):
        allowed = _range(low, high, low_open, high_open)
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: a finite number {allowed}".rstrip())
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(
            f"{key}={value!r} is out of range; allowed: {kind} {_range(low, high, low_open, high_open)}"
        )


def _range(low, high, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def validate(cfg: DictConfig) -> DictConfig:
    """Return a checked copy of `cfg` with model.head and loss resolved from `auto`."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    _check_dataset(cfg)
    _check_model(cfg)
    _check_init(cfg)
    _check_optimizer(cfg)
    _check_trainer(cfg)
    _check_tracking(cfg)
    check_choice(cfg, "backprop", BACKPROPS)
    check_number(cfg, "seed", 0, MAX_SEED, integer=True)
    _check_size(cfg)
    check_choice(cfg, "direction", DIRECTIONS)
    _check_objective(cfg)
    return cfg


def check_member(sections: dict) -> None:
    """A population member's own values (`sections`: its seed, init, optimizer and trainer as plain dicts),
    checked with the rules `validate` applies to them."""
    view = Sections(sections)
    folds = sections.get("dataset", {}).get("cv_folds")
    if folds:  # first, as `validate` checks the dataset first
        check_number(view, "dataset.cv_fold", 0, folds - 1, integer=True)
    _check_init(view)
    _check_optimizer(view)
    check_number(view, "trainer.stop_loss", 0, optional=True)
    check_number(view, "trainer.max_evals", 1, integer=True, optional=True)
    check_number(view, "seed", 0, MAX_SEED, integer=True)


def objective_metrics(dataset) -> tuple[str, ...]:
    """The metrics a run with this dataset measures: train, val (val_size > 0), test (test_size > 0)."""
    return (
        TRAIN_METRICS
        + (VAL_METRICS if (dataset.get("val_size") or 0) > 0 or dataset.get("cv_folds") else ())
        + (TEST_METRICS if dataset.test_size > 0 else ())
    )


def _check_objective(cfg) -> None:
    metrics = objective_metrics(cfg.dataset)
    for split, names, key in (("validation", VAL_METRICS, "val_size"), ("test", TEST_METRICS, "test_size")):
        if cfg.objective in names and cfg.objective not in metrics:
            raise ConfigError(
                f"objective={cfg.objective!r} needs a {split} split but dataset.{key}=0; "
                f"choose one of {_allowed(metrics)} or set dataset.{key} in (0, 1)"
            )
    check_choice(cfg, "objective", metrics)


def _check_dataset(cfg) -> None:
    check_choice(cfg, "dataset.name", tuple(N_CLASSES))
    check_number(cfg, "dataset.test_size", 0, 1, high_open=True)
    check_number(cfg, "dataset.noise", 0, MAX_NOISE)
    if cfg.dataset.name == "circles":
        check_number(cfg, "dataset.factor", 0, 1, high_open=True)
    check_number(cfg, "dataset.repeats", 1, integer=True)
    check_number(cfg, "dataset.random_state", 0, MAX_SEED, integer=True)
    check_number(cfg, "dataset.n_samples", 4, integer=True, optional=cfg.dataset.name in ("xor", "digits"))
    check_choice(cfg, "dataset.standardize", (True, False))
    if "val_size" not in cfg.dataset:  # a config saved before the validation split
        cfg.dataset.val_size = 0.0
    check_number(cfg, "dataset.val_size", 0, 1, high_open=True)
    test_size, val_size = cfg.dataset.test_size, cfg.dataset.val_size
    if test_size + val_size >= 1:
        raise ConfigError(
            f"dataset.val_size={val_size} with dataset.test_size={test_size} leaves no training rows "
            "(val_size + test_size must be < 1); use smaller fractions"
        )
    rows = dataset_rows(cfg.dataset)
    n_test = math.ceil(test_size * rows)  # scikit-learn's train_test_split rounds it up
    n_val = math.ceil(val_size * rows)
    _check_folds(cfg, rows - n_test)
    if rows - n_test < 1:
        raise ConfigError(
            f"dataset.test_size={test_size} leaves no training rows of the {rows} in "
            f"dataset={cfg.dataset.name}; use a smaller dataset.test_size or more rows"
        )
    if rows - n_test - n_val < 1:
        raise ConfigError(
            f"dataset.val_size={val_size} asks for {n_val} validation rows but dataset={cfg.dataset.name} "
            f"has {rows - n_test} rows outside its test split, and training needs at least one; use a "
            "smaller dataset.val_size or more rows"
        )


MAX_FOLDS = 100


def _check_folds(cfg, non_test_rows: int) -> None:
    """dataset.cv_folds (null, or k folds of the non-test rows) and dataset.cv_fold (the validating one)."""
    folds = cfg.dataset.get("cv_folds")
    if folds is None:
        return
    check_number(cfg, "dataset.cv_folds", 2, MAX_FOLDS, integer=True)
    check_number(cfg, "dataset.cv_fold", 0, folds - 1, integer=True)
    if cfg.dataset.val_size > 0:
        raise ConfigError(f"dataset.val_size={cfg.dataset.val_size} with dataset.cv_folds={folds}: the folds "
                          "are the validation rows; set dataset.val_size=0")  # fmt: skip
    if non_test_rows < folds:
        raise ConfigError(f"dataset.cv_folds={folds} needs at least {folds} non-test rows; "
                          f"dataset={cfg.dataset.name} has {non_test_rows}")  # fmt: skip


def check_fits(cfg, members: int = 1, where: str = "") -> None:
    """A run (or a population of `members` such runs) this machine can hold; the key to blame, else."""
    network, data = memory_needed(cfg)
    needed, available = members * (network + data), available_memory()
    if needed <= available:
        return
    of = f" for {members:,} population members, {describe_bytes(cfg)}" if members > 1 else ""
    gib = f"needs about {needed / 2**30:.1f} GiB{of}, more than this machine's {available / 2**30:.1f} GiB"
    memory = cfg.optimizer.get("memory") or 0
    if memory * cfg.trainer.precision // 8 > network / 2:  # the non-monotone search's memory dominates
        raise ConfigError(f"{where}optimizer.memory={memory} {gib}; use a smaller optimizer.memory"
                          + (" or fewer members" if members > 1 else ""))  # fmt: skip
    if members * network > available or data <= network:
        width = cfg.model.width if not isinstance(cfg.model.width, ListConfig) else list(cfg.model.width)
        raise ConfigError(f"{where}model.width={width} model.depth={cfg.model.depth} {gib}; use a smaller "
                          "network" + (" or fewer members" if members > 1 else ""))  # fmt: skip
    key = "dataset.repeats" if cfg.dataset.name == "xor" else "dataset.n_samples"
    rows = f"({dataset_rows(cfg.dataset):,} rows)"
    raise ConfigError(f"{where}{key}={OmegaConf.select(cfg, key)} {rows} {gib}; use fewer rows"
                      + (" or fewer members" if members > 1 else ""))  # fmt: skip


def _check_size(cfg) -> None:
    check_fits(cfg)


def _check_model(cfg) -> None:
    check_number(cfg, "model.depth", 0, integer=True)
    width = cfg.model.width
    if isinstance(width, ListConfig | list):
        if len(width) != cfg.model.depth:
            raise ConfigError(
                f"model.width={list(width)} has {len(width)} entries but model.depth={cfg.model.depth}; "
                "give one width per hidden layer, or a single int"
            )
        for i in range(len(width)):
            check_number(cfg, f"model.width.{i}", 1, integer=True)
    else:
        check_number(cfg, "model.width", 1, integer=True)
    check_choice(cfg, "model.activation", tuple(ACTIVATIONS))
    check_choice(cfg, "model.head", ("auto", *HEADS))
    check_choice(cfg, "loss", ("auto", *LOSSES))

    n_classes = N_CLASSES[cfg.dataset.name]
    if cfg.model.head == "auto":
        cfg.model.head = "sigmoid" if n_classes == 2 else "softmax"
    if cfg.model.head == "sigmoid" and n_classes != 2:
        raise ConfigError(
            f"model.head=sigmoid fits 2 classes but dataset={cfg.dataset.name} has {n_classes}; "
            "use model.head=softmax"
        )
    if cfg.loss == "auto":
        cfg.loss = "bce" if cfg.model.head == "sigmoid" else "ce"
    needed_head = LOSS_FOR_HEAD.get(cfg.loss)
    if needed_head is not None and needed_head != cfg.model.head:
        fits = [loss for loss in LOSSES if LOSS_FOR_HEAD.get(loss, cfg.model.head) == cfg.model.head]
        raise ConfigError(
            f"loss={cfg.loss} needs model.head={needed_head}; with model.head={cfg.model.head} "
            f"choose loss from {_allowed(fits)}"
        )


def _check_init(cfg) -> None:
    check_choice(cfg, "init.name", INITS)
    if cfg.init.name in ("small", "normal"):
        check_number(cfg, "init.std", 0, low_open=True)


def _check_optimizer(cfg) -> None:
    check_choice(cfg, "optimizer.name", OPTIMIZERS)
    name = cfg.optimizer.name
    if name == "polyak":  # its lr follows step_max: name the key the user set
        check_number(cfg, "optimizer.step_max", 0, low_open=True)
    check_number(cfg, "optimizer.lr", 0, low_open=True)
    if "batch_size" in cfg.optimizer:
        check_number(cfg, "optimizer.batch_size", 1, integer=True, optional=True)
    if name in ("sgd", "momentum"):
        check_number(cfg, "optimizer.momentum", 0, 1, high_open=True)
        check_choice(cfg, "optimizer.nesterov", (True, False))
        if cfg.optimizer.nesterov and cfg.optimizer.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum in (0, 1)")
    if name == "lbfgs":
        check_number(cfg, "optimizer.max_iter", 1, integer=True)
        check_number(cfg, "optimizer.history_size", 1, integer=True)
    if name == "polyak":
        check_number(cfg, "optimizer.step_max", 0, low_open=True)
        check_number(cfg, "optimizer.f_star")
        check_number(cfg, "optimizer.c", 0, low_open=True)
    if name == "bb":
        check_choice(cfg, "optimizer.variant", BB_VARIANTS)
        check_number(cfg, "optimizer.step_min", 0, low_open=True)
        check_number(cfg, "optimizer.step_max", 0, low_open=True)
        if cfg.optimizer.step_min > cfg.optimizer.step_max:
            raise ConfigError(
                f"optimizer.step_min={cfg.optimizer.step_min} is more than optimizer.step_max="
                f"{cfg.optimizer.step_max}; allowed: 0 < step_min <= step_max"
            )
    if name == "nonmonotone":
        check_number(cfg, "optimizer.memory", 1, integer=True)
        check_choice(cfg, "optimizer.first_trial", FIRST_TRIALS)
        check_number(cfg, "optimizer.f_star")
        check_number(cfg, "optimizer.c_step", 0, low_open=True)
    if name in ("backtracking", "nonmonotone"):
        check_number(cfg, "optimizer.c", 0, 1, low_open=True, high_open=True)
        check_number(cfg, "optimizer.beta", 0, 1, low_open=True, high_open=True)
        check_choice(cfg, "optimizer.reset", RESETS)
        check_number(cfg, "optimizer.growth", 1)
        check_number(cfg, "optimizer.lr_max", cfg.optimizer.lr)
        check_number(cfg, "optimizer.lr_min", 0, cfg.optimizer.lr, low_open=True)
        check_number(cfg, "optimizer.max_backtracks", 0, integer=True)
        check_choice(cfg, "optimizer.on_failure", FAILURE_MODES)
        check_number(cfg, "optimizer.tiny_step", 0, low_open=True)
        check_choice(cfg, "optimizer.trial_eval", TRIAL_EVALS)
    _check_schedules(cfg)


# The range of each schedulable number (gdlab.members.SCHEDULABLE), as check_number takes it.
SCHEDULED_RANGES = {
    "lr": dict(low=0, low_open=True),
    "momentum": dict(low=0, high=1, high_open=True),
    "c": dict(low=0, high=1, low_open=True, high_open=True),
    "beta": dict(low=0, high=1, low_open=True, high_open=True),
    "step_max": dict(low=0, low_open=True),
    "step_min": dict(low=0, low_open=True),
}


# Where an optimizer allows a number more than the table above: polyak's c is any positive number.
SCHEDULED_RANGES_OF = {("polyak", "c"): dict(low=0, low_open=True)}
# Numbers a scheduled value must stay within, as the fixed one does: (optimizer, number) -> (low, high) keys.
SCHEDULED_LIMITS = {
    ("backtracking", "lr"): ("lr_min", "lr_max"),
    ("nonmonotone", "lr"): ("lr_min", "lr_max"),
    ("bb", "step_min"): (None, "step_max"),
    ("bb", "step_max"): ("step_min", None),
}


def _check_schedules(cfg) -> None:
    """optimizer.<number>_schedule: [[epoch, value], ...] with epochs >= 0 rising, each value in its
    number's range, for the numbers this optimizer may change between epochs."""
    name, allowed = cfg.optimizer.name, SCHEDULABLE[cfg.optimizer.name]
    for key, entries in cfg.optimizer.items():
        if not key.endswith(SCHEDULE_SUFFIX) or entries is None:
            continue
        number, full = key[: -len(SCHEDULE_SUFFIX)], f"optimizer.{key}"
        if number not in allowed:
            options = "|".join(f"{n}{SCHEDULE_SUFFIX}" for n in allowed) or "none"
            raise ConfigError(f"{full} is not allowed with optimizer.name={name}; its schedules: {options}")
        shape = "[[epoch, value], ...] with integer epochs >= 0, rising"
        if not isinstance(entries, ListConfig | list) or not entries:
            raise ConfigError(f"{full}={_plain(entries)!r} must be a non-empty list {shape}")
        previous = -1
        for i, entry in enumerate(entries):
            if not isinstance(entry, ListConfig | list) or len(entry) != 2:
                raise ConfigError(
                    f"{full}.{i}={_plain(entry)!r} must be a pair [epoch, value]; the schedule is {shape}"
                )
            check_number(cfg, f"{full}.{i}.0", previous + 1, integer=True)
            check_number(
                cfg, f"{full}.{i}.1", **SCHEDULED_RANGES_OF.get((name, number), SCHEDULED_RANGES[number])
            )
            _check_limits(cfg, name, number, f"{full}.{i}.1", entry[1])
            previous = entry[0]


def _check_limits(cfg, name: str, number: str, key: str, value: float) -> None:
    low_key, high_key = SCHEDULED_LIMITS.get((name, number), (None, None))
    low = cfg.optimizer[low_key] if low_key else None
    high = cfg.optimizer[high_key] if high_key else None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(f"optimizer.{k}={cfg.optimizer[k]}" for k in (low_key, high_key) if k)
        raise ConfigError(f"{key}={value!r} is out of range; it must stay within {bounds}")


def _plain(node):
    return OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node


def _check_tracking(cfg) -> None:
    check_choice(cfg, "tracking.backend", TRACKING_BACKENDS)
    for key in ("tracking.dir", "tracking.experiment"):
        value = OmegaConf.select(cfg, key)
        if value is None and key == "tracking.experiment":
            continue
        if not isinstance(value, str) or not value.strip() or len(value.encode()) > MAX_NAME:
            default = " (or null: the dataset's name)" if key == "tracking.experiment" else ""
            raise ConfigError(f"{key}={value!r} is not allowed; use a non-empty string of at most {MAX_NAME} "
                              f"bytes{default}")  # fmt: skip
    if cfg.tracking.backend == "server":
        uri = cfg.tracking.get("uri")
        scheme = uri.partition("://")[0].lower() if isinstance(uri, str) and "://" in uri else None
        if scheme not in ("http", "https"):
            raise ConfigError(
                f"tracking.uri={mask_passwords(str(uri))!r} is not allowed with tracking=server; use an "
                "http:// or https:// tracking server URL such as http://127.0.0.1:5000 (a database: "
                "tracking=local with MLFLOW_TRACKING_URI)"
            )
    if cfg.tracking.backend != "none":
        check_number(cfg, "tracking.flush_seconds", 0)
    plots = select(cfg, "tracking.plots")
    if not (isinstance(plots, bool) or plots == "auto"):
        raise ConfigError(f"tracking.plots={plots!r} is not allowed; choose one of true, false, auto (a "
                          "single run's PNGs, not a population's)")  # fmt: skip
    for key in ("tracking.log_model", "tracking.system_metrics"):
        if not isinstance(OmegaConf.select(cfg, key, default=False), bool):
            raise ConfigError(f"{key}={select(cfg, key)!r} is not allowed; choose one of true, false")
    name = OmegaConf.select(cfg, "tracking.registered_model", default=None)
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name.encode()) > MAX_NAME):
        raise ConfigError(f"tracking.registered_model={name!r} is not allowed; use a model name (a non-empty "
                          f"string of at most {MAX_NAME} bytes) or null")  # fmt: skip


def _check_trainer(cfg) -> None:
    check_number(cfg, "trainer.max_epochs", 1, integer=True)
    check_choice(cfg, "trainer.accelerator", ACCELERATORS)
    check_choice(cfg, "trainer.precision", PRECISIONS)
    check_number(cfg, "trainer.stop_loss", 0, optional=True)
    check_number(cfg, "trainer.max_evals", 1, integer=True, optional=True)
    check_number(cfg, "trainer.threads", 1, integer=True, optional=True)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator=gpu but no CUDA GPU is available here; use trainer.accelerator=cpu|auto"
        )
