# Two commands from a fresh clone: `make quickstart` (the main job) and `make test` (the test suite).
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast test-all lint clean constraints

install: $(BIN)/deconvlab

$(BIN)/deconvlab: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(BIN)/deconvlab

quickstart: install
	$(BIN)/deconvlab sweep quickstart

# pytest workers (0 = one process): two finish the fast tests in ~2/3 of the time on 2 cores
# (docs/benchmarks.md, "The test suite").
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# What CI runs: everything but the benchmark scripts at their documented settings (make test-all runs those).
test: install
	$(PYTEST) -m "not benchmark"

test-fast: install
	$(PYTEST) -m "not slow and not benchmark"

test-all: install
	$(PYTEST)

# After upgrading a dependency in the venv: pin what is installed now (torch without its +cpu local label,
# so the Docker image's CUDA build satisfies the same pin). Run make test before committing the result.
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.tmp
	mv constraints.tmp constraints.txt

lint: install
	$(BIN)/ruff check platform tests benchmarks

clean:
	rm -rf $(VENV) mlflow.db mlartifacts outputs
