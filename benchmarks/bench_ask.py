"""What asking a population batch of P trials costs, per sampler and storage, in one process.

gdlab-sweep asks a batch's P trials one `study.ask()` at a time (Optuna has no batch ask), then draws each
one's parameter (the lr sweep's log-uniform lr), as its population mode does. Each row is measured twice:
through Optuna's own cached RDB storage, and through gdlab's (gdlab.sweep.owned_trials, which does not
re-read the batch's running trials at every ask). For each storage (a SQLite file; PostgreSQL at
127.0.0.1:5432 where it answers), sampler and P, a fresh study: (first) asking P trials into it empty, then
telling them all, then (second) asking the next P: what the second batch of a sweep pays, with P finished
trials to learn from. Milliseconds per ask, and the batch's asks in seconds.
Samplers: TPE as Optuna 5 makes it by default (multivariate, constant liar), QMC (scrambled Sobol),
random, and GPSampler (only at P <= --gp-max: its batch acquisition grows with the running trials).
Usage: python benchmarks/bench_ask.py [--sizes 64,1024,4096] [--storages sqlite,postgresql]
       [--samplers tpe,qmc,random,gp] [--tpe-max 1024] [--gp-max 64] [--optuna-max 1024] [--json out.json]
(--optuna-max: the largest P measured through Optuna's own storage, whose asks grow as P squared.)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from gdlab.sweep import owned_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
LR = optuna.distributions.FloatDistribution(1e-3, 10.0, log=True)
SAMPLERS = {
    "tpe": lambda: optuna.samplers.TPESampler(seed=42),
    "qmc": lambda: optuna.samplers.QMCSampler(seed=42, warn_independent_sampling=False),
    "random": lambda: optuna.samplers.RandomSampler(seed=42),
    "gp": lambda: optuna.samplers.GPSampler(seed=42),
}


def storage_url(kind: str, folder: Path) -> str | None:
    if kind == "sqlite":
        return f"sqlite:///{folder / f'{uuid.uuid4().hex}.db'}"
    import psycopg

    name = f"gdlab_ask_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
    except Exception:
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def ask_batch(study: optuna.Study, size: int) -> tuple[float, list]:
    started = time.perf_counter()
    trials = [study.ask() for _ in range(size)]
    for trial in trials:
        trial.suggest_float("optimizer.lr", LR.low, LR.high, log=True)
    return time.perf_counter() - started, trials


def measure(url: str, sampler: str, size: int, gdlab_storage: bool) -> dict:
    storage = owned_trials.wrap(optuna.storages.RDBStorage(url)) if gdlab_storage else url
    study = optuna.create_study(
        storage=storage, sampler=SAMPLERS[sampler](), study_name=f"ask-{sampler}-{size}"
    )
    first, trials = ask_batch(study, size)
    for trial in trials:
        lr = trial.params["optimizer.lr"]
        study.tell(trial, (math.log10(lr) + 1) ** 2)  # a smooth objective with its best at lr = 0.1
    second, _ = ask_batch(study, size)
    return {"first_s": first, "second_s": second, "first_ms_per_ask": first / size * 1000,
            "second_ms_per_ask": second / size * 1000}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,1024,4096")
    parser.add_argument("--storages", default="sqlite,postgresql")
    parser.add_argument("--samplers", default="tpe,qmc,random,gp")
    parser.add_argument("--tpe-max", type=int, default=1024)
    parser.add_argument("--gp-max", type=int, default=64)
    parser.add_argument("--optuna-max", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limits = {"tpe": args.tpe_max, "gp": args.gp_max}
    results = []
    print("| storage | sampler | P | cache | first batch, ms an ask | second batch, ms an ask | "
          "second batch, s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for storage in args.storages.split(","):
            for sampler in args.samplers.split(","):
                for size in (int(s) for s in args.sizes.split(",")):
                    if size > limits.get(sampler, size):
                        continue
                    for cache in ("optuna", "gdlab"):
                        if cache == "optuna" and size > args.optuna_max:
                            continue
                        url = storage_url(storage, Path(folder))
                        if url is None:
                            print(f"| {storage} | unavailable | | | | | |")
                            break
                        row = {"storage": storage, "sampler": sampler, "size": size, "cache": cache}
                        row.update(measure(url, sampler, size, gdlab_storage=cache == "gdlab"))
                        results.append(row)
                        first, second = row["first_ms_per_ask"], row["second_ms_per_ask"]
                        print(f"| {storage} | {sampler} | {size} | {cache} | {first:.2f} | {second:.2f} | "
                              f"{row['second_s']:.1f} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
