# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_REPO ?= demo-repo

.PHONY: install prometheus demo test lint format generate clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Compresses, serves and reports; keeps serving until Ctrl-C (DEMO_ARGS=--exit stops after it).
demo: $(INSTALLED)
	$(BIN)/gearbox demo --repo $(DEMO_REPO) $(DEMO_ARGS)

test: $(INSTALLED) prometheus
	$(BIN)/python -m pytest

# The metrics tests scrape a live gateway with a real Prometheus server (Debian's package).
# Installed here when missing; where that is impossible, say so (those tests then skip, naming
# the reason in pytest's summary).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's prometheus package for the metrics tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	      || echo "make: could not install prometheus; the tests that need it will be skipped" >&2; \
	  else \
	    echo "make: prometheus is missing and installing it needs root and apt-get;" \
	      "the tests that need it will be skipped" >&2; \
	  fi; }

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
