"""Sweep throughput in trial-epochs per second on the shipped learning-rate sweep (sweeps/lr.yaml).

The sweep: lab 003's moons net, fixed-LR GD, 300 epochs a trial, 64 learning rates, no pruning. Three ways
to run its trials, all measured by this one invocation, each in a fresh study in a temporary directory:
  (f) one process per trial: gdlab-train -m with Hydra's Optuna sweeper and the submitit_local launcher,
      on fewer trials (--process-trials): each one pays a few seconds of process start-up;
  (g) gdlab-sweep in one process, trial by trial (--population 1);
  (h) gdlab-sweep's population mode: the trials trained together as one batched model (--population 64);
  (u) (h) again with tracking=none, run by default when --tracking is local: what tracking costs (h);
  (m) gdlab-train -m +sweep=lr hydra/sweeper=gdlab: Hydra multirun through the same engine as (h).
Throughput = epochs trained by the study's trials (their history.csv) / (first trial's start to the last
trial's end), times read from the Optuna storage: the start-up of the command is left out, but in (f) every
trial's own process start-up counts. Targets: (h) >= 3x (g) and >= 20x (f), both tracked as --tracking says,
tracked (h) >= 0.6x untracked (u), and (m) within 20% of (h) (>= 0.8x); the whole tracked (h) command
(start-up and final report included) >= 0.8x the untracked one as a speed (untracked seconds / tracked
seconds), judged on the median of --rounds rounds of (h) and (u) alternated where --rounds is over 1.
Usage: python benchmarks/bench_sweeps.py [--modes f,g,h,u,m] [--trials 64] [--process-trials 8]
       [--population 64] [--tracking local|none] [--json out.json] [--keep DIR] [--rounds 1]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = "lr"
MODES = {
    "f": "(f) process per trial (gdlab-train -m, submitit_local)",
    "g": "(g) gdlab-sweep --population 1",
    "h": "(h) gdlab-sweep --population {population}",
    "u": "(u) = (h) with tracking=none",  # the untracked baseline of (h), when tracking is on
    "m": "(m) gdlab-train -m hydra/sweeper=gdlab, population {population}",
}
# (mode, against, at least this many times faster): tracking must keep the population's speed
TARGETS = [("h", "g", 3.0), ("h", "f", 20.0), ("h", "u", 0.6), ("m", "h", 0.8)]
WHOLE_TARGET = 0.8  # the whole tracked (h) command against the untracked (u) one, as speeds
# Nothing of the caller's environment may send the runs elsewhere than the temporary directory.
SCRUBBED_ENV = ["MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE", "GDLAB_MLFLOW_PARENT_RUN_ID"]


class BenchError(RuntimeError):
    """A mode that did not run its sweep to the end: the benchmark's figures would mean nothing."""


def entry_point(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise BenchError(f"cannot find {name}: run this with the project's venv (.venv/bin/python)")
    return found


def mode_command(mode: str, trials: int, population: int, tracking: str, workdir: Path, study: str,
                 storage: str) -> list[str]:  # fmt: skip
    if mode == "u":
        mode, tracking = "h", "none"
    common = [f"tracking={tracking}", f"tracking.dir={workdir / 'mlruns'}"]
    if mode == "m":
        return [entry_point("gdlab-train"), "-m", f"+sweep={SWEEP}", "hydra/sweeper=gdlab",
                f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.storage={storage}",
                f"hydra.sweeper.study_name={study}", f"gdlab_sweep.population={population}",
                "hydra.sweep.dir=multirun", *common]  # fmt: skip
    if mode == "f":
        return [entry_point("gdlab-train"), "-m", f"+sweep={SWEEP}", "hydra/sweeper=optuna",
                "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=60", "hydra.sweeper.n_jobs=1", f"hydra.sweeper.n_trials={trials}",
                f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}",
                f"hydra.sweep.dir={workdir / 'multirun'}", *common]  # fmt: skip
    size = 1 if mode == "g" else population  # "h" (and "u")
    return [entry_point("gdlab-sweep"), SWEEP, "--population", str(size), "--budget", str(trials),
            "--n-trials", str(trials), "--storage", storage, "--study", study, *common]  # fmt: skip


def history_dir(mode: str, workdir: Path, study: str, number: int) -> Path:
    """Where a trial's run wrote its outputs: Hydra's job directory (job n is trial n of a fresh study),
    or gdlab-sweep's outputs/sweeps/<study>/trial-<n> (relative to its cwd)."""
    if mode == "f":
        return workdir / "multirun" / str(number)
    return workdir / "outputs" / "sweeps" / study / f"trial-{number}"


def count_epochs(directory: Path, params: dict) -> int:
    """Rows of the run's history.csv (one per epoch trained), after checking the run is the trial's."""
    overrides = (directory / "overrides.txt").read_text().split()
    for key, value in params.items():
        if f"{key}={value}" not in overrides:
            raise BenchError(f"{directory} is not the run of the trial with {key}={value}")
    with open(directory / "history.csv", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def machine_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine have used (Linux's /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores other processes keep busy right now (a sample of `seconds`), None where unknown."""
    before = machine_cpu_seconds()
    time.sleep(seconds)
    after = machine_cpu_seconds()
    return None if before is None or after is None else (after - before) / seconds


def children_cpu_seconds() -> float:
    """CPU seconds of the finished subprocesses (and the descendants they waited for) and of this one."""
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime + own.ru_utime + own.ru_stime


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run_mode(mode: str, trials: int, population: int, tracking: str, root: Path) -> dict:
    """Run one mode's sweep in its own directory and study; its throughput from the study's trials."""
    import optuna

    workdir = root / mode
    workdir.mkdir(parents=True)
    study = f"bench-{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    command = mode_command(mode, trials, population, tracking, workdir, study, storage)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.setdefault("MPLBACKEND", "Agg")
    label = MODES[mode].format(population=population)
    print(f"{label}: {trials} trials ...", flush=True)
    started, cpu_before = time.time(), (machine_cpu_seconds(), children_cpu_seconds())
    with open(workdir / "stdout.log", "w") as out, open(workdir / "stderr.log", "w") as err:
        rc = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=err).returncode
    ended, cpu_after = time.time(), (machine_cpu_seconds(), children_cpu_seconds())
    other_cpu = (
        None
        if cpu_before[0] is None
        else max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
    )
    if other_cpu is not None and other_cpu > 0.1 * (ended - started):
        print(f"  other processes used {other_cpu:.0f} CPU seconds in these {ended - started:.0f} s: "
              "this mode's figures are slowed by them", file=sys.stderr)  # fmt: skip
    if rc != 0:
        tail = log_tail(workdir / "stderr.log")
        raise BenchError(f"{label} exited with {rc}; its stderr ends with:\n{tail}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frozen = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    states = [t.state.name for t in frozen]
    complete = states.count("COMPLETE")
    if len(frozen) != trials or complete != trials:
        summary = {s: states.count(s) for s in sorted(set(states))}
        raise BenchError(f"{label}: study {study} holds {len(frozen)} trials {summary}, expected {trials} "
                         f"COMPLETE; stdout ends with:\n{log_tail(workdir / 'stdout.log')}")  # fmt: skip
    epochs = sum(count_epochs(history_dir(mode, workdir, study, t.number), t.params) for t in frozen)
    first = min(t.datetime_start for t in frozen).timestamp()  # naive local times, as time.time()
    last = max(t.datetime_complete for t in frozen).timestamp()
    seconds = last - first
    return {
        "mode": mode,
        "label": label,
        "command": command,
        "trials": trials,
        "complete": complete,
        "epochs": epochs,
        "seconds": seconds,
        "trial_epochs_per_s": epochs / seconds,
        "seconds_per_trial": seconds / trials,
        "command_seconds": ended - started,
        "startup_seconds": first - started,  # command start to the first trial's start (left out)
        "wind_down_seconds": ended - last,  # the last trial's end to the command's exit (left out)
        "other_cpu_seconds": other_cpu,  # CPU time of processes not started by this command
    }


def ratios(results: dict) -> dict[str, float]:
    pairs = (("h", "g"), ("h", "f"), ("g", "f"), ("h", "u"), ("m", "h"))
    return {f"{a}/{b}": results[a]["trial_epochs_per_s"] / results[b]["trial_epochs_per_s"]
            for a, b in pairs if a in results and b in results}  # fmt: skip


def print_table(results: dict, ratio: dict, tracking: str, process_trials: int) -> None:
    print(f"\nsweeps/{SWEEP}.yaml, tracking={tracking}: throughput in trial-epochs per second")
    print("| mode | trials | trial-epochs | seconds | trial-epochs/s | vs (f) | vs (g) | command s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        vs = [f"{r['trial_epochs_per_s'] / results[b]['trial_epochs_per_s']:.2f}x" if b in results else "-"
              for b in ("f", "g")]  # fmt: skip
        print(f"| {r['label']} | {r['trials']} | {r['epochs']} | {r['seconds']:.1f} | "
              f"{r['trial_epochs_per_s']:.1f} | {vs[0]} | {vs[1]} | "
              f"{r['command_seconds']:.1f} |")  # fmt: skip
    if "f" in results:
        print(f"(f) runs {process_trials} trials (--process-trials), not the sweep's 64: every trial "
              "starts its own process (imports included), which is what (f) measures.")  # fmt: skip
    print("seconds: first trial's start to last trial's end (Optuna storage); command s: the whole command, "
          "start-up and final report included.")  # fmt: skip
    for a, b, target in TARGETS:
        key = f"{a}/{b}"
        if key in ratio:
            verdict = "holds" if ratio[key] >= target else "DOES NOT hold"
            print(f"target ({a}) >= {target:g}x ({b}): {ratio[key]:.2f}x, {verdict}")
    if "h" in results and "u" in results:  # the whole command, start-up and final report included
        tracked, untracked = results["h"]["command_seconds"], results["u"]["command_seconds"]
        whole = untracked / tracked
        verdict = "holds" if whole >= WHOLE_TARGET else "DOES NOT hold"
        print(f"target whole command (h) >= {WHOLE_TARGET:g}x (u): {tracked:.1f} s tracked, "
              f"{untracked:.1f} s "
              f"untracked: {whole:.2f}x, {verdict}")  # fmt: skip


def whole_command_rounds(results: dict, args, root: Path) -> list[dict]:
    """The whole tracked (h) command's time against the untracked (u) one's, round after round: the first
    round is the main run's, each further one runs (h) then (u) again in its own folder (a noisy machine
    moves a single ratio by more than the target's margin)."""
    if "h" not in results or "u" not in results:
        return []
    rounds = [{"h": results["h"]["command_seconds"], "u": results["u"]["command_seconds"]}]
    for index in range(1, args.rounds):
        folder = root / f"round-{index + 1}"
        folder.mkdir()
        rounds.append({mode: run_mode(mode, args.trials, args.population, args.tracking, folder)
                       ["command_seconds"] for mode in ("h", "u")})  # fmt: skip
    for each in rounds:
        each["ratio"] = each["u"] / each["h"]
    return rounds


def print_rounds(rounds: list[dict]) -> None:
    if len(rounds) < 2:
        return
    median = statistics.median(each["ratio"] for each in rounds)
    verdict = "holds" if median >= WHOLE_TARGET else "DOES NOT hold"
    listed = ", ".join(f"{each['h']:.1f} s / {each['u']:.1f} s = {each['ratio']:.2f}x" for each in rounds)
    print(f"whole command, {len(rounds)} rounds (tracked / untracked): {listed}")
    print(f"target whole command (h) >= {WHOLE_TARGET:g}x (u), median of {len(rounds)} rounds: "
          f"{median:.2f}x, {verdict}")  # fmt: skip


def machine_info() -> dict:
    import mlflow
    import optuna
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "git_commit": commit or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes", default="f,g,h,u,m", help="any of f,g,h,u,m (default all; u only when tracked)"
    )
    parser.add_argument("--trials", type=int, default=64, help="trials of (g) and (h) (default 64)")
    parser.add_argument("--process-trials", type=int, default=8, help="trials of (f) (default 8)")
    parser.add_argument("--population", type=int, default=64, help="population size of (h) (default 64)")
    parser.add_argument("--tracking", choices=["local", "none"], default="local")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", help="run in this new directory and keep it (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with (h) and (u): run both again, alternated, until there are this many rounds "
                        "of the whole-command ratio, and judge its median (default 1)")  # fmt: skip
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes {args.modes!r}: pick from f,g,h,u,m")
    if args.tracking == "none" and "u" in modes:
        modes.remove("u")  # (h) is already untracked
    if args.rounds < 1 or (args.rounds > 1 and not {"h", "u"} <= set(modes)):
        parser.error(f"--rounds {args.rounds}: use an integer >= 1; more than 1 needs modes h and u, tracked")
    started, busy = datetime.datetime.now().astimezone(), busy_cores()
    if busy is not None and busy > 0.3:
        print(f"bench_sweeps: other processes keep {busy:.1f} cores busy: they will slow some modes more "
              "than others", file=sys.stderr)  # fmt: skip
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=False)
        root_context = None
        root = Path(args.keep).resolve()
    else:
        root_context = tempfile.TemporaryDirectory(prefix="gdlab-bench-sweeps-")
        root = Path(root_context.name)
    results: dict = {}
    try:
        for mode in ("f", "g", "h", "u", "m"):
            if mode in modes:
                trials = args.process_trials if mode == "f" else args.trials
                results[mode] = run_mode(mode, trials, args.population, args.tracking, root)
        rounds = whole_command_rounds(results, args, root)
    except BenchError as error:
        print(f"bench_sweeps: error: {error}", file=sys.stderr)
        if args.keep:
            print(f"bench_sweeps: the runs are in {root}", file=sys.stderr)
        sys.exit(1)
    finally:
        if root_context is not None:
            root_context.cleanup()
    ratio = ratios(results)
    print_table(results, ratio, args.tracking, args.process_trials)
    print_rounds(rounds)
    if args.json:
        output = {
            "sweep": SWEEP,
            "tracking": args.tracking,
            "timestamp": started.isoformat(timespec="seconds"),
            "machine": {**machine_info(), "busy_cores_before": busy},
            "modes": results,
            "ratios": ratio,
            "whole_command_rounds": rounds,
            "targets": {
                f"{a}/{b}": {"at_least": t, "holds": ratio[f"{a}/{b}"] >= t}
                for a, b, t in TARGETS
                if f"{a}/{b}" in ratio
            },
        }
        with open(args.json, "w") as f:
            json.dump(output, f, indent=2)


if __name__ == "__main__":
    main()
