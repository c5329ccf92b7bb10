"""Population Based Training inside one batched model (gdlab.pbt), and the schedules that replay it."""

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution

import warm
from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate
from gdlab.fit import fit_population
from gdlab.pbt import PopulationBasedTraining
from gdlab.pbt_rules import PBTSettings, explore, quantile_size, ranked
from gdlab.tracking import run_name
from gdlab.train import run, summary

BASE = [
    "tracking=none",
    "dataset=moons",
    "dataset.n_samples=200",
    "trainer.max_epochs=60",
    "objective=test/loss",
]
LR = FloatDistribution(1e-3, 10.0, log=True)
LRS = [0.002, 0.01, 0.05, 0.2, 0.8, 2.0, 4.0, 8.0]
COMPARED = [
    "train/loss",
    "train/acc",
    "test/loss",
    "test/acc",
    "grad_norm",
    "step",
    "evals/total",
    "hp/optimizer.lr",
]


def settings(**changes) -> PBTSettings:
    base = PBTSettings(interval=10, fraction=0.25, perturb=(1.2, 0.8), resample_probability=0.25,
                       hyperparameters={"optimizer.lr": LR}, seed=0)  # fmt: skip
    return dataclasses.replace(base, **changes)


def member_overrides(key: str, value: float) -> list[str]:
    return [f"{key}={value!r}"]


def train(extra: list[str], values: list[float], pbt_settings: PBTSettings | None, key: str = "optimizer.lr",
          pbt_class=PopulationBasedTraining):  # fmt: skip
    overrides = [[*BASE, *extra, *member_overrides(key, v)] for v in values]
    cfgs = [validate(compose_config(o)) for o in overrides]
    pbt = None if pbt_settings is None else pbt_class(pbt_settings, "test/loss", "minimize", len(values))
    return fit_population(cfgs, overrides, pbt=pbt), pbt


def histories(results) -> list[list[dict]]:
    return [result.history.to_dict("records") for result in results]


# --- the rules --------------------------------------------------------------------------------------------


def test_top_and_bottom_quantiles_follow_ray_and_rank_nan_last():
    assert [quantile_size(n, 0.25) for n in (1, 2, 4, 5, 32)] == [0, 1, 1, 2, 8]
    assert quantile_size(32, 0.5) == 16 and quantile_size(32, 0.0) == 0
    values = {0: 0.3, 1: math.nan, 2: 0.1, 3: 0.3, 4: math.inf}
    assert ranked(values, "minimize") == [2, 0, 3, 1, 4]
    assert ranked(values, "maximize") == [0, 3, 2, 1, 4]


@pytest.mark.parametrize(
    "distribution", [LR, FloatDistribution(0.5, 0.99), FloatDistribution(0.1, 0.9, step=0.1)]
)
def test_explore_stays_inside_the_search_space(distribution):
    rng = random.Random(0)
    rules = settings(perturb=(1.2, 0.8, 3.0, 0.1), resample_probability=0.3)
    values = [distribution.low, distribution.high, (distribution.low + distribution.high) / 2]
    hows = set()
    for _ in range(3000):
        value, how = explore(rng.choice(values), distribution, rules, rng)
        assert distribution.low <= value <= distribution.high
        if distribution.step:
            assert (
                abs((value - distribution.low) / distribution.step - round((value - distribution.low) / 0.1))
                < 1e-9
            )
        values.append(value)
        hows.add(how)
    assert hows == {"resampled", "x1.2", "x0.8", "x3", "x0.1"}
    resampled = [explore(1.0, LR, settings(resample_probability=1.0), rng)[0] for _ in range(4000)]
    # log-uniform over [1e-3, 10]: a quarter of the draws below 10**-2, a half below 10**-1
    assert abs(np.mean(np.array(resampled) < 1e-2) - 0.25) < 0.03
    assert abs(np.mean(np.array(resampled) < 10**-1) - 0.5) < 0.03


# --- exploit and explore in a training population ---------------------------------------------------------


def test_exploits_happen_only_at_interval_boundaries_and_values_stay_in_bounds():
    results, pbt = train([], LRS, settings(interval=15, resample_probability=0.5))
    assert pbt.events and {event.epoch for event in pbt.events} <= {15, 30, 45}
    copied_at = {(event.member, event.epoch) for event in pbt.events}
    for p, result in enumerate(results):
        lr = result.history["hp/optimizer.lr"].to_numpy()
        assert ((LR.low <= lr) & (lr <= LR.high)).all()
        changes = [int(e) for e in result.history["epoch"][1:][np.diff(lr) != 0]]
        assert {(p, e) for e in changes} <= copied_at  # a member's lr changes only where it copied
        assert result.history["hp/optimizer.lr"].iloc[0] == LRS[p]
    for event in pbt.events:  # the bottom copies the top: its objective at the last epoch was worse
        rows = histories(results)
        before = {
            p: [r for r in rows[p] if r["epoch"] == event.epoch - 1] for p in (event.member, event.donor)
        }
        if before[event.member]:
            assert before[event.member][0]["test/loss"] >= before[event.donor][0]["test/loss"]


class CloneProbe(PopulationBasedTraining):
    """PBT that also checks, right after each round, that every member that copied now holds exactly its
    donor's weights, gradients, optimizer state and evaluation counts."""

    checked = 0

    def exploit_and_explore(self, module, epoch: int) -> None:
        super().exploit_and_explore(module, epoch)
        optimizer = module.optimizers().optimizer
        for event in (e for e in self.events if e.epoch == epoch):
            source, target = event.donor, event.member
            for param in module.model.parameters():
                assert torch.equal(param[target], param[source])
                assert param.grad is None or torch.equal(param.grad[target], param.grad[source])
            for tensor, axis in optimizer.member_tensors():
                assert torch.equal(tensor.select(axis, target), tensor.select(axis, source))
            for counts in module.counts:  # ls_failures, evals_fwd, evals_fwdbwd
                assert counts[target] == counts[source]
            CloneProbe.checked += 1


CLONE_MODES = {
    "momentum": (["optimizer=momentum", "optimizer.nesterov=true"], "optimizer.lr", [0.01, 0.05, 0.2, 1.0]),
    "adam": (["optimizer=adam"], "optimizer.lr", [0.001, 0.01, 0.05, 0.2]),
    "armijo-reuse-grow": (["optimizer=backtracking", "optimizer.lr_max=20", "optimizer.reset=grow",
                           "optimizer.trial_eval=forward_backward"], "optimizer.lr", [0.1, 0.5, 2.0, 8.0]),
    "nonmonotone": (["optimizer=nonmonotone", "optimizer.lr_max=20"], "optimizer.c", [1e-4, 0.01, 0.2, 0.6]),
    "bb": (["optimizer=bb"], "optimizer.step_max", [0.05, 0.5, 2.0, 8.0]),
}  # fmt: skip


@pytest.mark.parametrize("mode", list(CLONE_MODES))
def test_a_member_that_copies_becomes_an_exact_clone_of_its_donor(mode):
    """With factor 1 and no resampling, a copy must continue exactly as its donor: any state the copy
    missed (a momentum buffer, Adam's moments, a carried line-search evaluation, BB's last iterate,
    the evaluation counts) would make their next rows differ."""
    extra, key, values = CLONE_MODES[mode]
    space = FloatDistribution(min(values), max(values), log=True)
    CloneProbe.checked = 0
    results, pbt = train(extra, values, settings(perturb=(1.0,), resample_probability=0.0,
                                                 hyperparameters={key: space}), key, CloneProbe)  # fmt: skip
    assert CloneProbe.checked == len(pbt.events) > 0
    rows = histories(results)
    last_round = {}
    for event in pbt.events:
        last_round[event.member] = event
    for member, event in last_round.items():
        donor_changed_later = any(e.member == event.donor and e.epoch > event.epoch for e in pbt.events)
        member_rows = [r for r in rows[member] if r["epoch"] >= event.epoch]
        donor_rows = [r for r in rows[event.donor] if r["epoch"] >= event.epoch]
        if donor_changed_later:
            end = min(e.epoch for e in pbt.events if e.member == event.donor and e.epoch > event.epoch)
            member_rows = [r for r in member_rows if r["epoch"] < end]
            donor_rows = [r for r in donor_rows if r["epoch"] < end]
        assert len(member_rows) == len(donor_rows) > 0
        for column in [c for c in COMPARED if c in member_rows[0]] + [f"hp/{key}"]:
            np.testing.assert_allclose([r[column] for r in member_rows], [r[column] for r in donor_rows],
                                       rtol=0, atol=1e-12, err_msg=f"{mode}: {column}")  # fmt: skip


def test_pbt_with_fraction_zero_trains_exactly_the_plain_population():
    plain, _ = train([], LRS, None)
    with_pbt, pbt = train([], LRS, settings(fraction=0.0))
    assert pbt.events == []
    for a, b in zip(plain, with_pbt, strict=True):
        for column in ["train/loss", "train/acc", "test/loss", "test/acc", "grad_norm", "evals/total"]:
            np.testing.assert_allclose(
                a.history[column], b.history[column], rtol=0, atol=1e-12, err_msg=column
            )
        assert b.history["hp/optimizer.lr"].nunique() == 1
        assert abs(a.final["test/loss"] - b.final["test/loss"]) < 1e-12


def test_the_same_seed_gives_the_same_lineage_and_another_seed_another():
    def lineage(seed):
        results, pbt = train(["trainer.max_epochs=45"], LRS, settings(seed=seed))
        return (
            [dataclasses.asdict(e) for e in pbt.events],
            pbt.lineages,
            [r.final["test/loss"] for r in results],
        )

    first, again, other = lineage(3), lineage(3), lineage(4)
    assert first[0] and first[0] == again[0] and first[1] == again[1]
    assert first[2] == again[2]
    assert first[0] != other[0]


def test_a_diverged_member_is_replaced_at_the_next_boundary_and_ends_finished():
    # lr 1e200 diverges within a few epochs; the others do not
    results, pbt = train([], [0.05, 0.2, 0.5, 2.0, 1e200], settings(interval=20))
    replaced = [e for e in pbt.events if e.member == 4 and e.reason.startswith("diverged")]
    assert replaced and replaced[0].epoch == 20
    diverged_rows = results[4].history
    diverged_at = pbt.events and min(e.epoch for e in replaced)
    assert diverged_rows["epoch"].iloc[-1] == 59 and diverged_at in set(diverged_rows["epoch"])
    assert not math.isfinite(diverged_rows[diverged_rows["epoch"] < 20]["train/loss"].iloc[-1])
    assert LR.low <= diverged_rows["hp/optimizer.lr"].iloc[-1] <= LR.high  # explored from a donor
    assert results[4].final["diverged_at"] is None and math.isfinite(results[4].final["test/loss"])
    assert (
        results[4].final["epochs"] == 60
    )  # its last epoch + 1, though its history skips the epochs it was out
    assert replaced[0].donor in (0, 1, 2, 3)


# --- schedules and replay ------------------------------------------------------------------------------


def test_a_member_replays_as_a_single_run_to_1e_8():
    results, pbt = train([], LRS, settings(interval=10))
    rows = histories(results)
    copied = sorted(range(len(LRS)), key=lambda p: -len(pbt.lineages[p]))[:2]
    assert len(pbt.lineages[copied[0]]) >= 3  # weights trained by three slots or more
    for p in copied:
        replay = pbt.replay_overrides(p, rows, BASE)
        assert any(o.startswith("optimizer.lr_schedule=[[0,") for o in replay)
        single = run(replay)
        assert single.config.trainer.precision == 64
        lineage = pbt.lineage_rows(p, rows)
        assert [r["epoch"] for r in lineage] == single.history["epoch"].tolist()
        for column in ["train/loss", "test/loss", "grad_norm", "hp/optimizer.lr"]:
            expected = [r[column] for r in lineage]
            np.testing.assert_allclose(single.history[column], expected, rtol=0, atol=1e-8, err_msg=column)
        assert abs(single.final["test/loss"] - results[p].final["test/loss"]) < 1e-8
        assert results[p].final["pbt_replay"] == " ".join(replay)


def test_a_schedule_sets_its_values_from_each_listed_epoch_on():
    result = run(
        [*BASE, "trainer.max_epochs=12", "optimizer.lr=0.3", "optimizer.lr_schedule=[[4,0.5],[9,0.05]]"]
    )
    assert result.history["hp/optimizer.lr"].tolist() == [0.3] * 4 + [0.5] * 5 + [0.05] * 3
    assert run_name(result.config).endswith("-lr0.3sched-s42")  # not named after a fixed lr
    assert " lr=0.3 lr_schedule=0.5@4,0.05@9 " in summary(result)
    replayed = validate(compose_config([*BASE, "optimizer.lr_schedule=[[0,6.35],[20,5.08]]"]))
    assert "-lr6.35sched-" in run_name(replayed)
    polyak = validate(compose_config([*BASE, "optimizer=polyak", "optimizer.c_schedule=[[0,2.0],[3,0.5]]"]))
    assert polyak.optimizer.c_schedule == [[0, 2.0], [3, 0.5]]  # polyak's c is any positive number
    momentum = run(
        [*BASE, "trainer.max_epochs=6", "optimizer=momentum", "optimizer.momentum_schedule=[[0,0.0],[3,0.9]]"]
    )
    assert momentum.history["hp/optimizer.momentum"].tolist() == [0.0] * 3 + [0.9] * 3
    plain = run([*BASE, "trainer.max_epochs=6", "optimizer=momentum", "optimizer.momentum=0.0"])
    np.testing.assert_allclose(
        momentum.history["train/loss"][:4], plain.history["train/loss"][:4], rtol=0, atol=1e-12
    )
    assert abs(momentum.history["train/loss"].iloc[5] - plain.history["train/loss"].iloc[5]) > 1e-6


BAD_SCHEDULES = {
    "optimizer.lr_schedule=[[5,0.1],[3,0.2]]": "optimizer.lr_schedule.1.0=3 is out of range; allowed: an integer >= 6",  # noqa: E501
    "optimizer.lr_schedule=[[0,-0.1]]": "optimizer.lr_schedule.0.1=-0.1 is out of range; allowed: a number > 0",  # noqa: E501
    "optimizer.lr_schedule=[[0,nan]]": "optimizer.lr_schedule.0.1=nan is not allowed; allowed: a finite number > 0",  # noqa: E501
    "optimizer.lr_schedule=[0.1]": "optimizer.lr_schedule.0=0.1 must be a pair [epoch, value]",
    "optimizer.lr_schedule=[]": "optimizer.lr_schedule=[] must be a non-empty list",
    "optimizer=backtracking optimizer.lr_schedule=[[0,1.0],[5,20.0]]": (
        "optimizer.lr_schedule.1.1=20.0 is out of range; it must stay within optimizer.lr_min=1e-10 and "
        "optimizer.lr_max=10.0"
    ),
    "optimizer=bb optimizer.step_min_schedule=[[0,20.0]]": (
        "optimizer.step_min_schedule.0.1=20.0 is out of range; it must stay within optimizer.step_max=10.0"
    ),
    "+optimizer.momentum_schedule=[[0,0.5]]": "optimizer.momentum_schedule is not allowed with optimizer.name=gd; "  # noqa: E501
    "its schedules: lr_schedule",
}


@pytest.mark.parametrize("override", list(BAD_SCHEDULES))
def test_a_bad_schedule_is_one_line_naming_the_key(override):
    expected = BAD_SCHEDULES[override]
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*BASE, *override.split()]))
    assert str(error.value).startswith(expected)


def test_gdlab_run_trains_a_population_with_pbt_for_a_notebook():
    import gdlab

    settings = gdlab.PBTSettings(interval=10, fraction=0.25, perturb=(1.2, 0.8), resample_probability=0.25,
                                 hyperparameters={"optimizer.lr": LR}, seed=0)  # fmt: skip
    results = gdlab.run(
        ["+sweep=lr_pbt", *BASE], population=[{"optimizer.lr": lr} for lr in LRS], pbt=settings
    )
    assert len(results) == len(LRS) and sum(r.final["pbt_exploits"] for r in results) >= 5 * 2
    best = min(results, key=lambda r: r.final["test/loss"])
    replay = run(best.final["pbt_replay"].split())
    assert abs(replay.final["test/loss"] - best.final["test/loss"]) < 1e-8
    with pytest.raises(ConfigError, match="pbt needs one population of two or more members"):
        gdlab.run(BASE, population=[{"optimizer.lr": 0.1}], pbt=settings)
    with pytest.raises(ConfigError, match=r"pbt needs population=\[...\], a list of two or more members"):
        gdlab.run(BASE, pbt=settings)  # not one plain run that drops pbt without a word
    assert gdlab.PBTSettings({"optimizer.lr": LR}) == dataclasses.replace(settings, interval=10, seed=0)
    two = [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.2}]
    momentum = dataclasses.replace(
        settings, hyperparameters={"optimizer.momentum": FloatDistribution(0.0, 0.9)}
    )
    refused = {
        "'optimizer.momentum' is not allowed with optimizer.name=gd": (two, momentum),
        "pbt.interval=0 must be an integer >= 1": (two, dataclasses.replace(settings, interval=0)),
        r"pbt.perturb=\[\] must be a non-empty list": (two, dataclasses.replace(settings, perturb=())),
        r"population\[1\] optimizer.lr=50.0 is outside the pbt search space; allowed: \[0.001, 10\]": (
            [{"optimizer.lr": 0.5}, {"optimizer.lr": 50.0}], settings),
        "pbt members may differ only in optimizer.lr; these also differ: seed": (
            [{"optimizer.lr": 0.1, "seed": 1}, {"optimizer.lr": 0.2, "seed": 2}], settings),
        "optimizer.lr is PBT's, so optimizer.lr_schedule must be null": (
            [{"optimizer.lr": 0.1, "optimizer.lr_schedule": "[[0,0.1]]"}, {"optimizer.lr": 0.2}], settings),
        "optimizer.lr=0.0 is out of range": (
            two, dataclasses.replace(settings, hyperparameters={"optimizer.lr": FloatDistribution(0, 1.0)})),
    }  # fmt: skip
    for message, (members, bad) in refused.items():
        with pytest.raises(ConfigError, match=message):
            gdlab.run(BASE, population=members, pbt=bad)


# --- gdlab-sweep ---------------------------------------------------------------------------------------


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("gdlab-sweep")), *args]
    return warm.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


BAD_PBT_BLOCKS = [
    (
        ["gdlab_sweep.pbt.fraction=0.7"],
        "gdlab_sweep.pbt.fraction=0.7 is not allowed; use a number in [0, 0.5]",
    ),
    (["gdlab_sweep.pbt.interval=0"], "gdlab_sweep.pbt.interval=0 must be an integer >= 1"),
    (["gdlab_sweep.pbt.perturb=[1.2,nan]"], "gdlab_sweep.pbt.perturb.1=nan is not allowed; use a number > 0"),
    (
        ["gdlab_sweep.pbt.hyperparameters=[optimizer.momentum]"],
        "'optimizer.momentum' is not allowed with optimizer.name=gd; choose from optimizer.lr",
    ),
    (["+gdlab_sweep.pbt.every=3"], "gdlab_sweep.pbt.every is not a PBT setting"),
    (["gdlab_sweep.pbt.every=3"], "Could not override 'gdlab_sweep.pbt.every'. To append to your config use"),
    (
        ["hydra.sweeper.custom_search_space=gdlab.sweep.lr_per_optimizer"],
        "gdlab_sweep.pbt: hydra.sweeper.custom_search_space does not go with PBT",
    ),
    (["--population", "1"], "gdlab_sweep.pbt needs population mode"),
    (
        ["gdlab_sweep.pruner._target_=optuna.pruners.MedianPruner"],
        "gdlab_sweep.pruner=MedianPruner does not go with gdlab_sweep.pbt",
    ),
]


@pytest.mark.parametrize("args, expected", BAD_PBT_BLOCKS)
def test_a_bad_pbt_block_is_refused_in_one_line_before_any_trial(tmp_path: Path, refused, args, expected):
    code, stderr = refused("lr_pbt", *args)
    assert code == 2 and expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_hydras_optuna_sweeper_refuses_a_pbt_sweep_in_one_line(tmp_path: Path):
    command = [
        str(Path(sys.executable).with_name("gdlab-train")),
        "-m",
        "hydra/sweeper=optuna",
        "+sweep=lr_pbt",
        "hydra.sweeper.n_trials=1",
    ]
    done = warm.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "gdlab-train: error: this sweep has a gdlab_sweep.pbt block, which gdlab's engine runs (PBT needs "
        "its trials trained together); hydra/sweeper=optuna would train them one by one without PBT. Use "
        "hydra/sweeper=gdlab (the sweep files' default) or gdlab-sweep NAME"
    ]
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


@pytest.mark.slow
def test_gdlab_sweep_lr_pbt_records_each_member_and_the_lineage(tmp_path: Path):
    done = sweep(tmp_path, "lr_pbt", "trainer.max_epochs=60", "dataset.n_samples=200",
                 "gdlab_sweep.pbt.interval=10",
                 "--population", "8", "--budget", "9", "--progress", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="lr_pbt", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 9 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # the budget's ninth trial is a population of one: it trains, without PBT, and the sweep says so
    assert "trial #8 trains alone, without PBT" in done.stderr
    assert "pbt.replay" not in trials[8].user_attrs
    trials = trials[:8]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("sweep-lr_pbt")
    parent = client.search_runs([experiment.experiment_id], "tags.sweep = 'lr_pbt'")[0]
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    refits = [c for c in children if c.data.tags.get("gdlab.role") == "refit"]
    children = [c for c in children if c not in refits]
    assert len(children) == 9 and len(refits) == 1  # the trials, and the winner's replay on train + val
    alone = [c for c in children if c.data.tags["optuna.trial"] == "8"]
    assert len(alone) == 1 and "pbt.replay" not in alone[0].data.tags
    children = [c for c in children if c.data.tags["optuna.trial"] != "8"]
    exploits = 0
    for child in children:
        trial = trials[int(child.data.tags["optuna.trial"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert trial.user_attrs["pbt.replay"] == child.data.tags["pbt.replay"]
        lr = client.get_metric_history(child.info.run_id, "hp/optimizer.lr")
        assert sorted(m.step for m in lr) == list(range(60))
        assert all(1e-3 <= m.value <= 10 for m in lr)
        record = json.loads(
            Path(client.download_artifacts(child.info.run_id, "pbt.json", str(tmp_path))).read_text()
        )
        assert record["run_id"] == child.info.run_id and len(record["exploits"]) == int(
            child.data.tags["pbt.exploits"]
        )
        assert {e["epoch"] for e in record["exploits"]} <= {10, 20, 30, 40, 50}
        assert all(e["donor_run_id"] in {c.info.run_id for c in children} for e in record["exploits"])
        assert (
            record["schedule"]["optimizer.lr"][0][1] == trial.params["optimizer.lr"]
            or record["lineage"][0]["member"] != record["member"]
        )
        exploits += len(record["exploits"])
    assert exploits >= 5 * 2  # 5 rounds, 2 copies each (a quarter of 8)
    parent = client.get_run(parent.info.run_id)
    best = client.get_run(parent.data.tags["best.run_id"])
    assert parent.data.tags["best.pbt.replay"] == best.data.tags["pbt.replay"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pbt_lineage.png", "report/pbt_best_schedule.json"} <= artifacts
    path = client.download_artifacts(parent.info.run_id, "report/pbt_best_schedule.json", str(tmp_path))
    best_schedule = json.loads(Path(path).read_text())
    assert best_schedule["run_id"] == best.info.run_id
    # the best member's replay, as one run, ends where the member ended
    replay = run([*best_schedule["replay"], "tracking=none"])
    assert abs(replay.final["test/loss"] - best.data.metrics["final/test/loss"]) < 1e-8
