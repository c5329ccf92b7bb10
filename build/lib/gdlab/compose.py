"""Config composition, in one place: what `gdlab-train`, `gdlab.run` and `gdlab-sweep` each compose.

Every config starts here as Hydra's compose API makes it from `conf/` (the `gdlab.conf` package), then
goes to `gdlab.config.validate`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from gdlab.config import validate

CONFIG_MODULE = "gdlab.conf"
_MISSING = object()


def _process_id() -> int:
    return os.getpid()


# conf/config.yaml's run and sweep directories name the process, so two runs or multiruns started in the
# same second (Hydra's ${now:} has one-second resolution) never share one. Cached like Hydra's ${now:}: the
# value travels with the config to a launcher's job processes. OmegaConf 2.4 renamed register_new_resolver.
if not OmegaConf.has_resolver("gdlab_pid"):
    register = getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)
    register("gdlab_pid", _process_id, use_cache=True)


def compose_config(overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """The composed config of `overrides`, as `gdlab-train` would see it (not yet validated)."""
    with initialize_config_module(CONFIG_MODULE):
        return compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def search_path_override(config_dir: Path | None) -> list[str]:
    """Hydra's own way to add a config root (as gdlab-train --config-dir DIR does)."""
    return [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []


class VariantComposer:
    """Validated configs of `overrides` + a variant's overrides, as compose_config would make them.

    Hydra composes once per distinct set of config-group choices (a compose costs ~70 ms, as much
    as training a small run); a plain value such as optimizer.lr=0.1 is set on a copy.
    """

    def __init__(self, overrides: list[str]):
        self.overrides = list(overrides)
        self.parser = OverridesParser.create()
        self.composed = {(): compose_config(self.overrides)}

    def __call__(self, variant: list[str]) -> DictConfig:
        base, to_compose, values = self.composed[()], [], {}
        for text, override in zip(variant, self.parser.parse_overrides(variant), strict=True):
            current = OmegaConf.select(base, override.key_or_group, default=_MISSING)
            plain = not (override.is_add() or override.is_delete() or override.is_sweep_override())
            if plain and isinstance(current, int | float | str | bool):
                values[override.key_or_group] = override.value()
            else:  # a config group, a new or deleted key, a list or dict value: Hydra composes it
                to_compose.append(text)
        key = tuple(to_compose)
        if key not in self.composed:
            self.composed[key] = compose_config([*self.overrides, *to_compose])
        cfg = copy.deepcopy(self.composed[key])
        for name, value in values.items():
            OmegaConf.update(cfg, name, value, merge=False)
        return validate(cfg)
