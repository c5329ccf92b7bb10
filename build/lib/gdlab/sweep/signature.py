"""A study's experiment signature: every setting outside the search space that changes what a trial computes.

Trials of one study must be comparable: a 100-epoch trial and a 300-epoch one, or two datasets, in one
study would make its "best" meaningless. The first process that opens a study writes the signature (an
Optuna user attribute); every later one, `gdlab-sweep` or `gdlab-train -m` (Hydra's Optuna sweeper),
checks it and is refused with the differing keys. Where trials are recorded, how they are scheduled and
on what hardware they run is not part of it.
"""

from __future__ import annotations

import json

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf

from gdlab.masking import mask_passwords

SIGNATURE_ATTR = "gdlab.experiment"
# Not what a trial computes: where it is recorded, how the sweep schedules it, what hardware runs it.
IGNORED_PREFIXES = ("hydra", "tracking", "gdlab_sweep", "trainer.threads", "trainer.accelerator")
# ... except PBT: its settings, and the population it copies within, change what every trial computes.
PBT_PREFIXES = ("gdlab_sweep.pbt", "gdlab_sweep.population")


class ExperimentMismatch(ValueError):
    """A study holds trials of another experiment than this invocation's."""


def experiment_signature(task: DictConfig, sweeper_params, cli_overrides: list[str] = ()) -> dict[str, str]:
    """{key: value as JSON} of the task config, without the searched keys (those of the sweep file's
    `hydra.sweeper.params`, and any sweep override on the command line) but with the sweep's fixed values."""
    space = [f"{key}={value}" for key, value in (sweeper_params or {}).items()]
    distributions, fixed, _ = create_params_from_overrides(space)
    searched = set(distributions) | set(fixed) | set(sweep_override_keys(cli_overrides))
    flat = flatten(OmegaConf.to_container(task, resolve=True))
    counted = PBT_PREFIXES if OmegaConf.select(task, "gdlab_sweep.pbt") is not None else ()
    signature = {
        key: json.dumps(value, sort_keys=True)
        for key, value in flat.items()
        if (_under(key, counted) or not _under(key, IGNORED_PREFIXES)) and not _under(key, searched)
    }
    signature.update({key: json.dumps(value) for key, value in fixed.items()})
    return dict(sorted(signature.items()))


def sweep_override_keys(overrides: list[str]) -> list[str]:
    """Keys that command-line overrides sweep over (a,b,c; choice(...); interval(...))."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def check_same_experiment(study: optuna.Study, signature: dict[str, str]) -> None:
    """Write the study's signature if it has none; else refuse a different one, naming the keys."""
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        study.set_user_attr(SIGNATURE_ATTR, signature)
        return
    # A key set to null and a key not there mean the same (a study from before optimizer.lr_schedule existed).
    null = json.dumps(None)
    differing = sorted(
        k for k in stored.keys() | signature.keys() if stored.get(k, null) != signature.get(k, null)
    )
    if not differing:
        return
    shown = "; ".join(
        f"{k}={_show(signature.get(k))} here, {_show(stored.get(k))} in the study" for k in differing[:5]
    )
    more = f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""
    raise ExperimentMismatch(
        f"study {study.study_name!r} holds trials of another experiment: {shown}{more}. Run with the "
        "study's settings, or start a new study with --study NAME (gdlab-train -m: hydra.sweeper.study_name)"
    )


def _show(value: str | None) -> str:
    return "(unset)" if value is None else mask_passwords(value.strip('"'))
