# Two entry points for a newcomer: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1

.PHONY: run repro test lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files make re-runs skip the (5-minute) install unless pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

# The main job: the Prefect pipeline flow (temporary local server, nothing to start by hand).
run: $(VENV)/.installed
	$(BIN)/diffprune run

# The same stages through DVC (one `bin/diffprune <stage>` per dvc.yaml stage; it finds .venv by itself).
repro: $(VENV)/.installed
	$(BIN)/dvc repro

test: $(VENV)/.installed-dev
	$(BIN)/ruff check diffprune tasks flows tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder   # two workers; a file stays on one; longest files first (tests/conftest.py)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check diffprune tasks flows tests benchmarks

clean:
	rm -rf data models checkpoints metrics samples scores artifacts mlartifacts mlflow.db mlflow.db.lock
