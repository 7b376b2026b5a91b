# Quick start: `make demo` and `make test`. Both build .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pin the allocator so page faults do not dominate small-step timings (see README, Performance).
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: demo figures test lint bench mutation evidence clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/advtrain train --task emotion --preset stable --out runs/demo
	$(BIN)/advtrain report runs/demo

# The README's "What make demo does" figures: make demo's two commands into runs/demo with an
# empty data cache, then scripts/demo_figures.py rewrites the README block from the run's files.
figures: $(STAMP)
	$(BIN)/python scripts/demo_figures.py --run runs/demo --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# Inject plausible bugs one at a time (scripts/mutants.py) and check the tests catch them; writes
# benchmarks/results/mutation.md. A few minutes; not part of `make test` (or CI).
mutation: $(STAMP)
	$(BIN)/python scripts/mutation.py

# The guide's advice measured on the built-in tasks, 3 seeds per cell (scripts/evidence.py):
# writes benchmarks/results/evidence.md and benchmarks/results/evidence/*.png from resumable runs
# under runs/evidence/ (run it again after an interruption). 15 minutes on 2 quiet cores here
# (25 minutes with other work on the machine).
evidence: $(STAMP)
	$(BIN)/python scripts/evidence.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
