"""Population mode: P runs of one architecture trained together as one batched model.

Members share the data and the architecture (dataset, depth, width, activation, head, loss, gradient
mode, optimizer kind, trainer) and may differ in seed, init and the optimizer's numbers (lr, momentum,
c, beta, growth, ...). Their weights carry a leading member axis, W (P, fan_in, fan_out) and
b (P, 1, fan_out), and go through gdlab.model's own forward, losses and hand-written backward, which
batch over that axis. The loss that is differentiated is the sum of the members' losses, so each
member's gradient is exactly its own; the optimizers here keep every hyperparameter and all state per
member. Member p's curve is therefore the curve of training it alone (to rounding: float64, 1e-8).

A member that diverges, reaches its stop condition or is pruned retires: its weights and history are
kept as they were, it stops moving, and the others go on.
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned
from torch import Tensor
from torch.optim import Optimizer

from gdlab.config import ConfigError
from gdlab.model import MLP, per_member
from gdlab.module import GDLabModule
from gdlab.optimizers import armijo_condition

POPULATION_OPTIMIZERS = ("gd", "sgd", "momentum", "backtracking")
# What may differ between members; any other difference puts two runs in different populations.
MEMBER_KEYS = ("seed", "init", "optimizer.lr", "optimizer.momentum", "optimizer.c", "optimizer.beta",
               "optimizer.growth", "optimizer.lr_max", "optimizer.lr_min", "optimizer.max_backtracks",
               "optimizer.tiny_step", "trainer.stop_loss", "trainer.max_evals")  # fmt: skip


def architecture_key(cfg: DictConfig) -> str:
    """What members of one population must share: the config without its member keys.

    With mini-batches the batch order comes from the seed, so then the seed is shared too.
    """
    shared = OmegaConf.to_container(cfg, resolve=True)
    minibatch = cfg.optimizer.get("batch_size") is not None
    for key in MEMBER_KEYS:
        if key == "seed" and minibatch:
            continue
        parent, _, leaf = key.rpartition(".")
        (shared[parent] if parent else shared).pop(leaf, None)
    return json.dumps(shared, sort_keys=True, default=str)


def group_by_architecture(cfgs: list[DictConfig]) -> list[list[int]]:
    """Indices of `cfgs` grouped into populations, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(architecture_key(cfg), []).append(i)
    return list(groups.values())


def check_population(cfgs: list[DictConfig]) -> None:
    if not cfgs:
        raise ConfigError("population: no members given")
    name = cfgs[0].optimizer.name
    if name not in POPULATION_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={name!r} cannot train as a population; choose one of "
            f"{'|'.join(POPULATION_OPTIMIZERS)} (or train its runs one by one)"
        )
    key = architecture_key(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        if architecture_key(cfg) != key:
            raise ConfigError(
                f"population member {i} differs from member 0 outside {', '.join(MEMBER_KEYS)}; "
                "members must share dataset, model, loss, backprop, optimizer kind and trainer"
            )


class PopulationMLP(MLP):
    """P members' MLPs as one model: W (P, fan_in, fan_out), b (P, 1, fan_out)."""

    def __init__(self, members: list[MLP]):
        first = members[0]
        super().__init__(first.sizes, first.activation, first.head, first.loss_name, population=len(members))
        self.size = len(members)
        self.to(first.W[0].dtype)
        with torch.no_grad():
            for l, (W, b) in enumerate(self.layers):
                W.copy_(torch.stack([m.layers[l][0] for m in members]))
                b.copy_(torch.stack([m.layers[l][1] for m in members]).unsqueeze(1))

    def member(self, p: int) -> MLP:
        """Member p as a standalone MLP (a copy of its weights, on the CPU)."""
        model = MLP(self.sizes, self.activation, self.head, self.loss_name).to(self.W[0].dtype)
        with torch.no_grad():
            for (W, b), (W_all, b_all) in zip(model.layers, self.layers, strict=True):
                W.copy_(W_all[p])
                b.copy_(b_all[p, 0])
        return model

    def grad_norms(self) -> Tensor:
        """(2 * layers, P): [|dW1|, |db1|, |dW2|, ...] per member."""
        return torch.stack([p.grad.flatten(1).norm(dim=1) for layer in self.layers for p in layer])


def member_values(cfgs: list[DictConfig], key: str, default=math.nan) -> Tensor:
    return torch.tensor([float(c.optimizer.get(key, default)) for c in cfgs], dtype=torch.float64)


class PopulationGD(Optimizer):
    """torch.optim.SGD's update (plain, heavy-ball or Nesterov momentum) with lr and momentum per member."""

    def __init__(self, params, cfgs: list[DictConfig], active: Tensor):
        super().__init__(params, {})
        self.lr = member_values(cfgs, "lr")
        self.momentum = member_values(cfgs, "momentum", 0.0)
        self.nesterov = bool(cfgs[0].optimizer.get("nesterov", False))
        self.active = active
        self.last_step: dict = {}

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            losses = closure()
        lr, momentum = self.lr.to(losses), self.momentum.to(losses)
        for p in self.param_groups[0]["params"]:
            d = p.grad
            if momentum.any():
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(per_member(momentum, d)).add_(d)
                buf = state["momentum_buffer"]
                d = d + per_member(momentum, d) * buf if self.nesterov else buf
            p.sub_(torch.where(per_member(self.active, p), per_member(lr, p) * d, 0))
        n = len(self.lr)
        self.last_step = dict(trial_step=self.lr, step=self.lr, backtracks=torch.zeros(n),
                              loss_after=torch.full((n,), math.nan), failed=torch.zeros(n),
                              evals_fwd=torch.zeros(n), evals_fwdbwd=self.active.cpu().double(),
                              start_eval=torch.zeros(n, dtype=torch.long),
                              end_eval=torch.full((n,), -1, dtype=torch.long))  # fmt: skip
        return losses


class PopulationBacktracking(Optimizer):
    """gdlab.optimizers.Backtracking with a step size per member: each member accepts or backtracks alone.

    Every closure call evaluates all members; a member's count only grows while it is still searching.
    """

    def __init__(self, params, cfgs: list[DictConfig], active: Tensor):
        super().__init__(params, {})
        first = cfgs[0].optimizer
        self.reset, self.on_failure = first.reset, first.on_failure
        self.reuse = first.trial_eval == "forward_backward"
        self.h = {k: member_values(cfgs, k) for k in ("lr", "c", "beta", "growth", "lr_max", "lr_min",
                                                      "max_backtracks", "tiny_step")}  # fmt: skip
        self.active = active
        n = len(cfgs)
        self.last_accepted = torch.full((n,), math.nan, dtype=torch.float64)
        self.accepted_loss = torch.full(
            (n,), math.nan, dtype=torch.float64
        )  # reuse: f at w, .grad holds g(w)
        self.last_step: dict = {}

    def first_trial_step(self) -> Tensor:
        h, last = self.h, self.last_accepted
        if self.reset == "initial":
            return h["lr"].clone()
        rule = last if self.reset == "previous" else torch.minimum(last * h["growth"], h["lr_max"])
        return torch.where(last.isnan(), h["lr"], rule)

    @torch.no_grad()
    def step(self, closure):
        params = self.param_groups[0]["params"]
        active, n = self.active.cpu(), len(self.active)
        evals_fwd, evals_fwdbwd = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        n_evaluated = 0  # forward+backward evaluations so far in this step: indexes the module's records
        fresh = active & self.accepted_loss.isnan()  # without reuse, accepted_loss stays NaN
        f0 = self.accepted_loss.clone()
        start_eval = torch.full((n,), -1, dtype=torch.long)  # -1: the start came with the previous step
        if fresh.any():
            # Evaluates every member; a carried-over member gets the same f and g again (same weights).
            with torch.enable_grad():
                f0 = torch.where(fresh, closure().detach().cpu().double(), f0)
            evals_fwdbwd += fresh
            start_eval[fresh] = 0
            n_evaluated = 1
        w0 = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        grad_sq = sum((g * g).flatten(1).sum(dim=1) for g in grads).cpu().double()
        moving = per_member(active.to(w0[0].device), w0[0])

        def move_to(step: Tensor) -> None:
            step = step.to(w0[0])
            for p, w, g in zip(params, w0, grads, strict=True):
                p.copy_(torch.where(moving, w - per_member(step, g) * g, w))

        h = self.h
        trial = step = self.first_trial_step()
        searching, accepted = active.clone(), torch.zeros(n, dtype=torch.bool)
        backtracks, f_after = (
            torch.zeros(n, dtype=torch.float64),
            torch.full((n,), math.nan, dtype=torch.float64),
        )
        end_eval = torch.full((n,), -1, dtype=torch.long)
        next_grads = [g.clone() for g in grads] if self.reuse else []
        while searching.any():
            move_to(step)
            with torch.set_grad_enabled(self.reuse):  # forward_backward: an accepted trial's gradient is kept
                f_trial = closure().detach().cpu().double()
            (evals_fwdbwd if self.reuse else evals_fwd).add_(searching)
            passed = searching & armijo_condition(f_trial, f0, step, grad_sq, h["c"])
            if self.reuse:
                for kept, p in zip(next_grads, params, strict=True):
                    kept.copy_(torch.where(per_member(passed.to(p.device), p), p.grad, kept))
                end_eval[passed] = n_evaluated
                n_evaluated += 1
            accepted |= passed
            f_after = torch.where(passed, f_trial, f_after)
            searching &= ~passed
            searching &= (backtracks < h["max_backtracks"]) & (step * h["beta"] >= h["lr_min"])
            step = torch.where(searching, step * h["beta"], step)
            backtracks += searching

        failed = active & ~accepted
        self.accepted_loss = torch.where(accepted, f_after, math.nan) if self.reuse else self.accepted_loss
        self.last_accepted = torch.where(failed, torch.maximum(step, h["lr_min"]), step)
        if failed.any():  # a failed trial is not taken: revert to w, or lab 003's tiny step
            step = torch.where(failed, h["tiny_step"] if self.on_failure == "tiny_step" else 0.0, step)
            move_to(step)
            f_after = torch.where(failed, f0 if self.on_failure == "revert" else math.nan, f_after)
        if self.reuse:
            for p, kept in zip(params, next_grads, strict=True):
                p.grad.copy_(kept)
        self.last_step = dict(
            trial_step=trial, step=torch.where(active, step, 0.0), backtracks=backtracks, loss_after=f_after,
            failed=failed.double(), evals_fwd=evals_fwd, evals_fwdbwd=evals_fwdbwd,
            start_eval=start_eval, end_eval=end_eval,
        )  # fmt: skip
        return f0


def build_population_optimizer(cfgs: list[DictConfig], params, active: Tensor) -> Optimizer:
    if cfgs[0].optimizer.name == "backtracking":
        return PopulationBacktracking(params, cfgs, active)
    return PopulationGD(params, cfgs, active)


class PopulationModule(GDLabModule):
    """GDLabModule for a population: one history, evaluation count and stop condition per member."""

    def __init__(self, model: PopulationMLP, cfgs: list[DictConfig], test=None):
        first = cfgs[0]
        super().__init__(model, first.optimizer, first.backprop, test)
        self.cfgs = cfgs
        n = model.size
        self.active = torch.ones(n, dtype=torch.bool)
        self.histories: list[list[dict]] = [[] for _ in range(n)]
        self.member_callbacks: list[list] = [[] for _ in range(n)]
        zeros = lambda: torch.zeros(n, dtype=torch.float64)  # noqa: E731 (per-member counts, on the CPU)
        self.member_evals = {"fwd": zeros(), "fwdbwd": zeros()}
        self.member_failures = zeros()
        self.epoch_evals = {"fwd": zeros(), "fwdbwd": zeros()}
        self.stop_loss = [-math.inf if c.trainer.stop_loss is None else c.trainer.stop_loss for c in cfgs]
        self.max_evals = [
            math.inf if c.trainer.get("max_evals") is None else c.trainer.max_evals for c in cfgs
        ]
        self.diverged: list[int | None] = [None] * n
        self.pruned: list[str | None] = [None] * n
        self.retired: list[MLP | None] = [None] * n
        self.carried_over = ()

    def configure_optimizers(self):
        self.active = self.active.to(self.device)
        return build_population_optimizer(self.cfgs, self.model.parameters(), self.active)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for counts in self.epoch_evals.values():
            counts.zero_()

    def training_step(self, batch, batch_idx):
        X, T = batch
        opt = self.optimizers()
        evaluations = []  # per forward+backward evaluation: (losses, accuracies, grad norms), all per member

        def closure():
            if not torch.is_grad_enabled():
                return self.model.loss(self.model(X), T)
            opt.zero_grad()
            losses, Z = self.loss_and_logits(X, T)
            self.manual_backward(losses.sum())  # each member's gradient is that of its own loss
            evaluations.append((losses.detach(), self.model.accuracy(Z.detach(), T), self.model.grad_norms()))
            return losses

        opt.step(closure=closure)
        record = opt.optimizer.last_step
        for kind in ("fwd", "fwdbwd"):
            self.epoch_evals[kind] += record[f"evals_{kind}"]
            self.member_evals[kind] += record[f"evals_{kind}"]
        start = pick(evaluations, record["start_eval"], self.carried_over)
        if evaluations and (record["end_eval"] >= 0).any():  # reuse: the accepted trials start the next step
            self.carried_over = pick(evaluations, record["end_eval"], start)
        self.epoch.add_step(start, X.shape[0])

    def on_train_epoch_end(self) -> None:
        for p, row in self.epoch_rows().items():
            self.histories[p].append(row)
            try:
                for callback in self.member_callbacks[p]:
                    callback(row)
            except TrialPruned as pruned:
                self.pruned[p] = str(pruned) or "pruned by the sweep's pruner"
                self.retire(p)
                continue
            if not math.isfinite(row["train/loss"]):
                self.diverged[p] = row["epoch"]
                self.retire(p)
            elif row["train/loss"] < self.stop_loss[p] or row["evals/total"] >= self.max_evals[p]:
                self.retire(p)
        if not self.active.any():
            self.trainer.should_stop = True

    @torch.no_grad()
    def retire(self, p: int) -> None:
        """Keep member p as it is now and stop moving it; zeros keep a diverged member's arithmetic finite."""
        self.retired[p] = self.model.member(p).cpu()
        self.active[p] = False
        for W, b in self.model.layers:
            W[p].zero_()
            b[p].zero_()

    def epoch_rows(self) -> dict[int, dict]:
        """This epoch's history row for every active member (the columns of a single run's rows)."""
        e, record = self.epoch, self.optimizers().optimizer.last_step
        train = e.train_metrics()
        self.member_failures += record["failed"]
        per_step = [record[k] for k in ("loss_after", "trial_step", "step", "backtracks", "failed")]
        counts = [self.member_failures, self.epoch_evals["fwd"], self.epoch_evals["fwdbwd"],
                  self.member_evals["fwd"] + self.member_evals["fwdbwd"]]  # fmt: skip
        device = train[0].device
        columns = torch.cat([
            torch.stack([*train, *e.test_metrics]),
            e.grad_norms,
            torch.stack([c.to(device=device, dtype=train[0].dtype) for c in per_step + counts]),
        ]).tolist()  # fmt: skip
        n_metrics, n_norms = 2 + len(e.test_metrics), len(e.grad_norms)
        metrics, norms = columns[:n_metrics], columns[n_metrics : n_metrics + n_norms]
        loss_after, trial_step, step, backtracks, failed, failures, fwd, fwdbwd, total = columns[
            n_metrics + n_norms :
        ]
        now, rows = time.perf_counter() - self.started, {}
        for p in self.active.nonzero().flatten().tolist():
            row = {"epoch": self.current_epoch, "train/loss": metrics[0][p], "train/acc": metrics[1][p]}
            if e.test_metrics:
                row["test/loss"], row["test/acc"] = metrics[2][p], metrics[3][p]
            member_norms = [n[p] for n in norms]
            row["grad_norm"] = math.sqrt(sum(n * n for n in member_norms))
            for l in range(len(member_norms) // 2):
                row[f"grad_norm/layer{l + 1}"] = math.hypot(member_norms[2 * l], member_norms[2 * l + 1])
            row.update(
                loss_before=metrics[0][p],
                loss_after=loss_after[p],
                trial_step=trial_step[p],
                step=step[p],
                backtracks=int(backtracks[p]),
                ls_failed=int(failed[p]),
                ls_failures=int(failures[p]),
                **{"evals/fwd": int(fwd[p]), "evals/fwdbwd": int(fwdbwd[p]), "evals/total": int(total[p]),
                   "time": now},
            )  # fmt: skip
            rows[p] = row
        return rows

    def member_view(self, p: int) -> SimpleNamespace:
        """Member p with the attributes train.collect_result reads from a single run's module."""
        return SimpleNamespace(
            model=self.retired[p] if self.retired[p] is not None else self.model.member(p).cpu(),
            history=self.histories[p],
            evals={k: int(v[p]) for k, v in self.member_evals.items()},
            ls_failures=int(self.member_failures[p]),
            diverged_at=self.diverged[p],
        )


def pick(evaluations: list[tuple], index: Tensor, fallback: tuple) -> tuple:
    """Per member, the values of evaluation `index[p]` (or `fallback`'s where index[p] is -1)."""
    picked = []
    for k, values in enumerate(zip(*evaluations, strict=True)):
        stacked = torch.stack(values)  # (evaluations, ..., P)
        chosen = stacked[
            index.clamp(min=0).to(stacked.device), ..., torch.arange(stacked.shape[-1], device=stacked.device)
        ]
        chosen = chosen.movedim(0, -1)  # (..., P)
        picked.append(
            torch.where((index >= 0).to(chosen.device), chosen, fallback[k]) if fallback else chosen
        )
    return tuple(picked)
