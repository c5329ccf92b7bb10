"""Members of a population: what they may differ in, how runs are grouped, and the retire signal.

Light on purpose (OmegaConf only): gdlab-sweep groups its trials here without importing torch.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from gdlab.schedules import SCHEDULE_KEYS

# L-BFGS's two-loop recursion couples all parameters, so it has no per-member form: it trains as P = 1.
POPULATION_OPTIMIZERS = ("gd", "sgd", "momentum", "backtracking", "adam", "polyak", "bb", "nonmonotone")
# What may differ between members; any other difference puts two runs in different populations.
MEMBER_KEYS = ("seed", "init", "optimizer.lr", "optimizer.momentum", "optimizer.c", "optimizer.beta",
               "optimizer.growth", "optimizer.lr_max", "optimizer.lr_min", "optimizer.max_backtracks",
               "optimizer.tiny_step", "optimizer.f_star", "optimizer.step_max", "optimizer.step_min",
               "optimizer.c_step", "trainer.stop_loss", "trainer.max_evals", "dataset.cv_fold")  # fmt: skip
MEMBER_KEYS = MEMBER_KEYS + SCHEDULE_KEYS


class Retire(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an epoch callback to retire its member now (a sweep's pruner); the message says why.

    The member keeps its weights and history, ends KILLED, and the other members go on.
    """


def architecture_key(cfg: DictConfig) -> str:
    """What members of one population must share: the config without its member keys.

    With mini-batches the batch order comes from the seed, and batches are cut from one set of rows, so
    then the seed and the validation fold are shared too.
    """
    shared = OmegaConf.to_container(cfg, resolve=True)
    minibatch = cfg.optimizer.get("batch_size") is not None
    for key in MEMBER_KEYS:
        if key in ("seed", "dataset.cv_fold") and minibatch:
            continue
        parent, _, leaf = key.rpartition(".")
        (shared[parent] if parent else shared).pop(leaf, None)
    return json.dumps(shared, sort_keys=True, default=str)


def group_by_architecture(cfgs: list[DictConfig]) -> list[list[int]]:
    """Indices of `cfgs` grouped by what members must share, in first-seen order (a group of an
    optimizer outside POPULATION_OPTIMIZERS trains its runs one by one)."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(architecture_key(cfg), []).append(i)
    return list(groups.values())
