# The project's commands. `make test` and `make demo` work on a fresh machine: they create
# the virtual environment, and (for tests that need it) start a Docker engine and build the image.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo stubs lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## Run the whole test suite.
test: $(VENV)/.installed
	$(PY) -m pytest

## Regenerate the Python stubs from protos/ (the generated code is committed).
stubs: $(VENV)/.installed
	$(PY) protos/generate.py

lint: $(VENV)/.installed
	$(VENV)/bin/buf lint
