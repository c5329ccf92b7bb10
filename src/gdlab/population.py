"""A population: one validated config that its members share, and each member's own values.

Members differ only in `gdlab.members.MEMBER_KEYS` (seed, init, the optimizer's numbers, stops and
schedules). Composing and validating a config with Hydra and OmegaConf costs milliseconds, so a
population of thousands composes its shared config once (once per distinct set of config-group choices)
and checks each member's own numbers as plain values, with the same rules `gdlab.config.validate` applies
(`gdlab.config.check_member`). A member's full config is made only when someone asks for it (`config`).

Light on purpose (OmegaConf and Hydra's override parser): gdlab-sweep groups trials without torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from gdlab.config import MAX_SEED, ConfigError, Sections, check_fits, check_member
from gdlab.members import MEMBER_KEYS, POPULATION_OPTIMIZERS, architecture_key

_MISSING = object()
_PLAIN = (int, float, bool)


def member_sections(container: dict) -> dict:
    """The parts of a plain config container a member's own values live in (seed, init, optimizer,
    trainer, dataset: its validation fold), copied one level deep so a member's values can be set on them."""
    return {
        "seed": container["seed"],
        "init": dict(container["init"]),
        "optimizer": dict(container["optimizer"]),
        "trainer": dict(container["trainer"]),
        "dataset": dict(container["dataset"]),
    }


def set_key(sections: dict, key: str, value) -> None:
    parent, _, leaf = key.rpartition(".")
    (sections[parent] if parent else sections)[leaf] = value


def get_key(sections: dict, key: str, default=None):
    parent, _, leaf = key.rpartition(".")
    return (sections[parent] if parent else sections).get(leaf, default)


class Population:
    """P members: `shared` (a validated config; its member keys hold member 0's values) and `members`,
    each member's member-key sections (`member_sections`), its overrides, and its base config (the
    validated config its config-group choices compose to; most members share one object)."""

    def __init__(self, bases: list[DictConfig], members: list[dict], overrides: list[list[str]]):
        self.bases, self.members, self.overrides = bases, members, overrides
        self.shared = bases[0]
        self._configs: dict[int, DictConfig] = {}
        self._containers: dict[int, dict] = {}  # id(base) -> its plain container

    def __len__(self) -> int:
        return len(self.members)

    @classmethod
    def from_configs(cls, cfgs: Sequence[DictConfig], overrides: list[list[str]] | None = None) -> Population:
        """A population of validated configs, each its own base (what gdlab-sweep's trials are)."""
        members = [member_sections(OmegaConf.to_container(cfg, resolve=True)) for cfg in cfgs]
        population = cls(list(cfgs), members, overrides or [[] for _ in cfgs])
        population._configs = dict(enumerate(cfgs))
        return population

    def values(self, key: str, default=None) -> list:
        """Every member's value of a member key (`default` where a member's config lacks it)."""
        return [get_key(m, key, default) for m in self.members]

    def view(self, p: int) -> DictConfig | Sections:
        """Member p's config to read (cfg.optimizer.lr, cfg.tracking.dir): its config where one was made,
        else plain sections, made in microseconds."""
        if p in self._configs:
            return self._configs[p]
        base = self.bases[p]
        container = self._containers.get(id(base))
        if container is None:
            container = self._containers[id(base)] = OmegaConf.to_container(base, resolve=True)
        return Sections({**container, **self.members[p]})

    def config(self, p: int) -> DictConfig:
        """Member p's full config, as composing its overrides would make it (made once, when asked)."""
        if p not in self._configs:
            container = OmegaConf.to_container(self.bases[p], resolve=True)
            container.update(copy.deepcopy(self.members[p]))
            self._configs[p] = OmegaConf.create(container)
        return self._configs[p]

    def architecture_groups(self) -> list[list[int]]:
        """Member indices grouped by what members must share (`gdlab.members.architecture_key`), computed
        once per distinct base, in first-seen order."""
        keys: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        minibatch = self.shared.optimizer.get("batch_size") is not None
        for p, base in enumerate(self.bases):
            key = keys.get(id(base))
            if key is None:
                key = keys[id(base)] = architecture_key(base)
            if minibatch:  # the seed orders the batches, cut from one fold's rows: such members train apart
                key += f"|seed={self.members[p]['seed']}|fold={self.members[p]['dataset'].get('cv_fold')}"
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    def replicated(self, k: int) -> Population:
        """Each member k times in a row (gdlab.replicates): replicate r has seed + r, and `seed=...` last
        among its overrides; member i's replicates are members i*k ... i*k + k - 1."""
        if k == 1:
            return self
        bases, members, overrides = [], [], []
        for p, member in enumerate(self.members):
            for r in range(k):
                seed = member["seed"] + r
                if seed > MAX_SEED:
                    raise ConfigError(f"seed={member['seed']} with {k} replicates reaches seed={seed}; "
                                      f"allowed: seeds up to {MAX_SEED}")  # fmt: skip
                bases.append(self.bases[p])
                members.append({**member, "seed": seed})
                overrides.append([*self.overrides[p], f"seed={seed}"])
        return Population(bases, members, overrides)

    def folded(self, k: int) -> Population:
        """Each member k times in a row, validating on folds 0 .. k-1 of dataset.cv_folds=k (which the
        members' config must already set); member i's folds are members i*k ... i*k + k - 1."""
        bases, members, overrides = [], [], []
        for p, member in enumerate(self.members):
            for fold in range(k):
                bases.append(self.bases[p])
                members.append({**member, "dataset": {**member["dataset"], "cv_fold": fold}})
                overrides.append([*self.overrides[p], f"dataset.cv_fold={fold}"])
        return Population(bases, members, overrides)

    def folds(self) -> list[int] | None:
        """Each member's validation fold, where members validate on different folds (one dataset with
        per-member rows, gdlab.data.load_folds); None otherwise."""
        folds = [m["dataset"].get("cv_fold", 0) for m in self.members]
        return folds if self.shared.dataset.get("cv_folds") and len(set(folds)) > 1 else None

    def subset(self, indices: list[int]) -> Population:
        part = Population([self.bases[i] for i in indices], [self.members[i] for i in indices],
                          [self.overrides[i] for i in indices])  # fmt: skip
        part._configs = {j: self._configs[i] for j, i in enumerate(indices) if i in self._configs}
        return part


def check_population(population: Population) -> None:
    """One population: an optimizer with a per-member form, members that share an architecture, and
    memory enough for all of them (checked before anything is built)."""
    if not len(population):
        raise ConfigError("population: no members given")
    name = population.shared.optimizer.name
    if len(population) > 1 and name not in POPULATION_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={name!r} cannot train as a population (its update couples all parameters, "
            f"so it runs as one member only); choose one of {'|'.join(POPULATION_OPTIMIZERS)}"
        )
    check_fits(population.shared, members=len(population), where="population: ")
    groups = population.architecture_groups()
    if len(groups) > 1:
        raise ConfigError(
            f"population member {groups[1][0]} differs from member 0 outside {', '.join(MEMBER_KEYS)}; "
            "members must share dataset, model, loss, backprop, optimizer kind and trainer"
        )


class PopulationComposer:
    """Populations from CLI-style overrides shared by all members plus each member's own overrides.

    Hydra composes once per distinct set of config-group choices and other non-member overrides (a
    compose costs ~70 ms); a member's plain number on a member key (optimizer.lr=0.1, seed=3) is set on
    plain sections and checked with `check_member`, microseconds a member.
    """

    def __init__(self, overrides: list[str]):
        from gdlab.compose import VariantComposer

        self.composer = VariantComposer(overrides)
        self.plain_keys = {*MEMBER_KEYS, "init.std"}
        self.bases: dict[tuple, tuple[DictConfig, dict]] = {}
        self.interpolates: bool | None = None  # whether the shared config holds one (`config`)

    def base(self, composed: tuple[str, ...]) -> tuple[DictConfig, dict]:
        """(validated config, its member sections) of the shared overrides plus `composed`."""
        if composed not in self.bases:
            cfg = self.composer(list(composed))
            self.bases[composed] = (cfg, member_sections(OmegaConf.to_container(cfg, resolve=True)))
        return self.bases[composed]

    def __call__(self, population: Sequence[dict | list | tuple]) -> Population:
        bases, members, overrides = [], [], []
        for i, member in enumerate(population):
            values, composed = self.split(member)
            base, sections = self.base(composed)
            own = {"seed": sections["seed"], **{k: dict(v) for k, v in sections.items() if k != "seed"}}
            for key, value in values.items():
                if get_key(own, key, _MISSING) is _MISSING:  # a key its config lacks: Hydra says so
                    base, own = self.compose_member(member)
                    break
                set_key(own, key, value)
            try:
                check_member(own)
            except ConfigError as error:
                raise ConfigError(f"population[{i}]: {error}") from None
            bases.append(base)
            members.append(own)
            overrides.append([*self.composer.overrides, *as_overrides(member)])
        return Population(bases, members, overrides)

    def config(self, member: dict) -> DictConfig:
        """One member's validated config, equal to what `self.composer` makes of its overrides. Where they
        are all plain numbers replacing plain values of member keys, they are set on a copy of the validated
        shared config and checked with `check_member` (~1 ms; a full validation is ~5 ms); otherwise, or
        where the shared config holds an interpolation (a value that follows another, as polyak's lr follows
        step_max, which validation resolves first) or is valid only with the member's values, through the
        composer."""
        values, composed = self.split(member)
        if self.interpolates is None:
            self.interpolates = holds_interpolation(OmegaConf.to_container(self.composer.composed[()]))
        if composed or not values or self.interpolates:
            return self.composer(as_overrides(member))
        try:
            base, sections = self.base(())
        except ConfigError:  # a shared value valid only beside the member's (nesterov, a momentum)
            return self.composer(as_overrides(member))
        own = {"seed": sections["seed"], **{k: dict(v) for k, v in sections.items() if k != "seed"}}
        if not all(isinstance(get_key(own, key), int | float | str | bool) for key in values):
            return self.composer(as_overrides(member))  # a group (init), a null or missing key: Hydra's
        cfg = copy.deepcopy(base)
        for key, value in values.items():
            set_key(own, key, value)
            OmegaConf.update(cfg, key, value, merge=False)
        check_member(own)
        return cfg

    def split(self, member: dict | list | tuple) -> tuple[dict, tuple[str, ...]]:
        """A member's plain numbers on member keys, and the overrides Hydra must compose."""
        if not isinstance(member, dict):
            return self.split_texts(list(member))
        values, composed = {}, []
        for key, value in member.items():
            if key in self.plain_keys and type(value) in _PLAIN:
                values[key] = value
            else:
                composed.append(f"{key}={value}")
        return values, tuple(composed)

    def split_texts(self, texts: list[str]) -> tuple[dict, tuple[str, ...]]:
        values, composed = {}, []
        for text, override in zip(texts, self.composer.parser.parse_overrides(texts), strict=True):
            value = override.value() if not override.is_sweep_override() else None
            plain = not (override.is_add() or override.is_delete() or override.is_sweep_override())
            if plain and override.key_or_group in self.plain_keys and type(value) in _PLAIN:
                values[override.key_or_group] = value
            else:
                composed.append(text)
        return values, tuple(composed)

    def compose_member(self, member) -> tuple[DictConfig, dict]:
        cfg = self.composer(as_overrides(member))
        return cfg, member_sections(OmegaConf.to_container(cfg, resolve=True))


def holds_interpolation(node) -> bool:
    """Whether a plain config container (unresolved) holds an interpolation such as ${.step_max}."""
    if isinstance(node, dict):
        return any(holds_interpolation(value) for value in node.values())
    if isinstance(node, list):
        return any(holds_interpolation(value) for value in node)
    return isinstance(node, str) and "${" in node


def as_overrides(member: dict | list | tuple) -> list[str]:
    if isinstance(member, dict):
        return [f"{key}={value}" for key, value in member.items()]
    return list(member)
