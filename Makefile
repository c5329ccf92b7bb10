# Two entry points: `make demo` (set up and train once) and `make test` (set up and run the suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gdlab-installed

.PHONY: install demo test test-serial lint format bench bench-sweeps bench-writer bench-pbt bench-population bench-replicates bench-time-to-quality clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/gdlab-train

# The suite in 2 worker processes (pytest-xdist; worksteal: each takes the next test as it finishes one),
# then the tests marked `alone` one at a time: their heartbeats' grace periods are a few seconds, which a
# second busy test on a 2-core machine can stretch. ~8.5 minutes on 2 cores (README, Development).
test: install
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not alone" --durations=20
	$(BIN)/python -m pytest -m alone

# Every test one at a time, as `pytest` alone does.
test-serial: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_overhead.py

bench-sweeps: install
	$(BIN)/python benchmarks/bench_sweeps.py
	$(BIN)/python benchmarks/bench_sweeps.py --tracking none

bench-writer: install
	$(BIN)/python benchmarks/bench_writer.py

bench-pbt: install
	$(BIN)/python benchmarks/bench_pbt.py

bench-population: install
	$(BIN)/python benchmarks/bench_population.py --tracked 1024 --plot docs/population_scaling.png
	$(BIN)/python benchmarks/bench_ask.py
	$(BIN)/python benchmarks/bench_trial_config.py

bench-replicates: install
	$(BIN)/python benchmarks/bench_replicates.py

# Hours on 2 cores with every sweep, P and seed: see the script's --help to measure a part.
bench-time-to-quality: install
	$(BIN)/python benchmarks/bench_time_to_quality.py --json time_to_quality.json --plot docs/time_to_quality.png

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
