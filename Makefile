# Two entry points: `make demo` (set up and train once) and `make test` (set up and run the suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gdlab-installed

.PHONY: install demo test test-parallel lint format bench bench-sweeps bench-writer bench-pbt bench-population bench-replicates bench-time-to-quality clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/gdlab-train

test: install
	$(BIN)/python -m pytest

# The same suite in 3 worker processes, each taking the next test as it finishes one (pytest-xdist's
# worksteal): ~13-16 minutes on 2 cores instead of ~16-20 serially. CI runs `make test`, serially.
test-parallel: install
	$(BIN)/python -m pytest -n 3 --dist worksteal

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

bench-replicates: install
	$(BIN)/python benchmarks/bench_replicates.py

# Hours on 2 cores with every sweep, P and seed: see the script's --help to measure a part.
bench-time-to-quality: install
	$(BIN)/python benchmarks/bench_time_to_quality.py --json time_to_quality.json --plot docs/time_to_quality.png

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
