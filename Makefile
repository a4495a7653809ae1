# Two commands from a fresh clone: `make quickstart` (the main job) and `make test` (the test suite).
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast lint clean

install: $(BIN)/deconvlab

$(BIN)/deconvlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/deconvlab

quickstart: install
	$(BIN)/deconvlab sweep quickstart

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check platform tests benchmarks

clean:
	rm -rf $(VENV) mlflow.db mlartifacts outputs
