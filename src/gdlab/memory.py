"""What one run (one population member) needs in memory, counted from its config without building it:
its parameters, its optimizer's state and the activations of its data (gdlab.config.check_fits refuses a
population that does not fit before any work)."""

from __future__ import annotations

import os

from omegaconf import ListConfig

from gdlab.data import DIGITS_ROWS, N_CLASSES, N_FEATURES


def dataset_rows(dataset) -> int:
    """Rows the dataset config makes, before the split (see gdlab.data.make_arrays)."""
    if dataset.name == "xor":
        return 4 * dataset.repeats
    if dataset.name == "digits":
        return min(dataset.n_samples or DIGITS_ROWS, DIGITS_ROWS)
    return dataset.n_samples


# Copies of the parameters an optimizer keeps besides the weights and their gradients (gdlab.optimizers,
# gdlab.step_rules): momentum's buffer, Adam's two moments, a line search's start point and direction (and
# with trial_eval=forward_backward the accepted trial's gradient), BB's last weights and gradients.
STATE_COPIES = {"gd": 0, "sgd": 1, "momentum": 1, "adam": 2, "polyak": 0, "bb": 2, "backtracking": 2,
                "nonmonotone": 2, "lbfgs": 4}  # fmt: skip


def parameter_count(cfg) -> tuple[int, int]:
    """(parameters, units) of the network a config describes, counted without building it."""
    n_in, n_out = N_FEATURES[cfg.dataset.name], N_CLASSES[cfg.dataset.name]
    if cfg.model.head == "sigmoid":  # one logit for two classes
        n_out = 1
    if isinstance(cfg.model.width, ListConfig | list):
        sizes = [n_in, *cfg.model.width, n_out]
        return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=False)), sum(sizes)
    if cfg.model.depth == 0:
        return (n_in + 1) * n_out, n_in + n_out
    width, depth = cfg.model.width, cfg.model.depth
    parameters = (n_in + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * n_out
    return parameters, n_in + depth * width + n_out


def member_bytes(cfg) -> dict[str, int]:
    """Bytes one run (one population member) needs, by part: its parameters (weights, gradients, and a copy
    kept when it retires), its optimizer's state, and the activations of its data (Z, A and dZ of every
    layer for every row: the training rows' forward and backward, the held-out rows' forward)."""
    parameters, units = parameter_count(cfg)
    number = cfg.trainer.precision // 8
    copies = STATE_COPIES.get(cfg.optimizer.name, 2)
    if cfg.optimizer.get("trial_eval") == "forward_backward":
        copies += 1
    memory = cfg.optimizer.get("memory") or 0  # the non-monotone search's past losses
    return {
        "parameters": 3 * parameters * number,
        "optimizer state": copies * parameters * number + memory * number,
        "activations": dataset_rows(cfg.dataset) * units * 3 * number,
    }


def memory_needed(cfg) -> tuple[int, int]:
    """(bytes of the network: parameters and optimizer state; bytes of the data and activations) of one run
    (see `member_bytes`)."""
    parts = member_bytes(cfg)
    return parts["parameters"] + parts["optimizer state"], parts["activations"]


def describe_bytes(cfg) -> str:
    """ "3.2 MiB a member (parameters 96.0 KiB, optimizer state 64.0 KiB, activations 3.0 MiB)"."""
    parts = member_bytes(cfg)
    return f"{size(sum(parts.values()))} a member ({', '.join(f'{k} {size(v)}' for k, v in parts.items())})"


def size(n: float) -> str:
    """Bytes as people read them: 512 B, 3.2 KiB, 9.2 MiB, 1.1 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def available_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
