# The project's commands. `make test` and `make demo` work on a fresh machine: they create
# the virtual environment, and (for tests that need it) start a Docker engine and build the image.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo stubs lint image engine tools

# A PEM file of CA certificates workspaces should trust besides Debian's (a TLS-intercepting proxy): `make image`
# and `make test` build it into the image; `make demo` gives it to the orchestrator, which mounts it into each
# workspace at run time, so the shared image is neither rebuilt nor retagged.
EXTRA_CA_BUNDLE ?=
IMAGE_CA_BUNDLE = $(EXTRA_CA_BUNDLE)
# The npm tests (real `npm install`s of the vite-react and astro-basic templates, the browser HMR test through the
# preview gateway) are opt-in: `make test TEST_NPM=1`. TEST_CA_BUNDLE is a PEM file the workspaces these tests
# start trust (mounted at run time, `--extra-ca-bundle`; the image stays the shared one): the one that lets them
# through a TLS-intercepting proxy to the registry. CI (.ci/run) turns both on.
TEST_NPM ?=
TEST_CA_BUNDLE ?=
# The template of `make demo`'s session.
DEMO_TEMPLATE ?= node-basic
# `make demo PREVIEW_ADDRESS=127.0.0.1:8080` also serves the preview gateway there (README "Previews").
PREVIEW_ADDRESS ?=
# Workspaces `make demo` keeps started for new sessions (its own session waits for them, then claims one).
DEMO_WARM_POOL ?= 2

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## Run the whole test suite, the tests marked `docker` included (against a real engine and the core image).
test: $(VENV)/.installed tools engine image
	$(if $(TEST_NPM),WORKSPACE_TEST_NPM=1) $(if $(TEST_CA_BUNDLE),WORKSPACE_TEST_CA_BUNDLE=$(TEST_CA_BUNDLE)) $(PY) -m pytest

## An orchestrator on 127.0.0.1:50051 with the built-in templates and a demo session to open in a browser
## (its URL is printed); Ctrl-C stops it and deletes every session created meanwhile. DEMO_TEMPLATE=vite-react
## picks another template, DEMO_WARM_POOL=0 turns the warm pool off.
demo: IMAGE_CA_BUNDLE =
demo: $(VENV)/.installed engine image
	$(PY) -m orchestrator --demo $(DEMO_TEMPLATE) --warm-pool $(DEMO_WARM_POOL) $(if $(EXTRA_CA_BUNDLE),--extra-ca-bundle $(EXTRA_CA_BUNDLE)) $(if $(PREVIEW_ADDRESS),--preview-address $(PREVIEW_ADDRESS))

## Command-line tools the tests call besides the venv's: jq and curl (the README's lines use them), PostgreSQL's
## server (the state tests start one on loopback; tests/postgres_support.py) and Debian's chromium (the browser
## test of the preview gateway drives it headless over the DevTools protocol).
tools:
	@command -v jq >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq; }
	@command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

## Start a Docker engine unless one answers (installs docker.io when missing).
engine:
	core_image/ensure_docker.sh

## Build the core image workspace-core (cached: nothing to do when nothing changed); prints its pinned tag.
image: $(VENV)/.installed engine
	$(PY) -m core_image.build $(if $(IMAGE_CA_BUNDLE),--extra-ca-bundle $(IMAGE_CA_BUNDLE))

## Regenerate the code of the contract from protos/ (committed): the Python stubs, and the TypeScript of
## clients/node (buf generate with its local protoc-gen-es, installed by `npm ci` from package-lock.json).
stubs: $(VENV)/.installed clients/node/node_modules/.package-lock.json
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) protos/generate.py  # protoc finds its plugins on PATH

clients/node/node_modules/.package-lock.json: clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund

## Lint and format checks (ruff), type checks (mypy, settings in pyproject.toml), and the protos (buf).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
