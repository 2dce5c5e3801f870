# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_REPO ?= demo-repo

.PHONY: install demo test lint format generate clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Compresses, serves and reports; keeps serving until Ctrl-C (DEMO_ARGS=--exit stops after it).
demo: $(INSTALLED)
	$(BIN)/gearbox demo --repo $(DEMO_REPO) $(DEMO_ARGS)

test: $(INSTALLED)
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerates the Python stubs of every .proto under protos/ (committed; a test checks freshness).
generate: $(INSTALLED)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) $(DEMO_REPO) .pytest_cache .ruff_cache
