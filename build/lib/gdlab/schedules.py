"""Numbers that change between epochs: which ones an optimizer has, and their piecewise-constant schedules.

A schedule is optimizer.<number>_schedule = [[epoch, value], ...]: from each listed epoch on, every step
of that epoch and the next ones uses its value (before the first listed epoch, the fixed optimizer.<number>).
Population Based Training (gdlab.pbt) changes the same numbers, and a PBT member's history replays as a
single run with these schedules. Light on purpose (OmegaConf only), like gdlab.members.
"""

from __future__ import annotations

from omegaconf import DictConfig

# The numbers of each optimizer that may change between epochs: by a schedule (optimizer.<number>_schedule,
# [[epoch, value], ...]) or by Population Based Training. Each is a (P,) tensor of the same name on the
# optimizer (gdlab.optimizers), read at every step.
SCHEDULABLE = {
    "gd": ("lr",),
    "sgd": ("lr", "momentum"),
    "momentum": ("lr", "momentum"),
    "adam": ("lr",),
    "backtracking": ("lr", "c", "beta"),
    "nonmonotone": ("lr", "c", "beta"),
    "polyak": ("c", "step_max"),
    "bb": ("step_min", "step_max"),
    "lbfgs": (),
}
SCHEDULE_SUFFIX = "_schedule"
SCHEDULE_KEYS = tuple(
    sorted({f"optimizer.{n}{SCHEDULE_SUFFIX}" for names in SCHEDULABLE.values() for n in names})
)


def schedules_of(optimizer: DictConfig) -> dict[str, list[tuple[int, float]]]:
    """{number: [(epoch, value), ...]} of an optimizer config's set schedules (optimizer.lr_schedule, ...)."""
    return {
        key[: -len(SCHEDULE_SUFFIX)]: [(int(epoch), float(value)) for epoch, value in entries]
        for key, entries in optimizer.items()
        if key.endswith(SCHEDULE_SUFFIX) and entries is not None
    }
