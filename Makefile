# corral: install, build templates, run the server, test. Every step is idempotent and quick
# when already done, so `make run` / `make test` can be repeated (CI runs `make test` in a fresh
# clone on a machine where the templates may already be built).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

DATA_DIR ?= /var/lib/corral
LISTEN ?= 127.0.0.1:7700
PYTHON ?= python3
# One hung test must not eat CI's whole 90 minutes: SIGINT makes pytest print where it was.
PYTEST_TIMEOUT ?= 3600
VENV := .venv
PY := $(VENV)/bin/python
# Re-installs the project into the venv only when its declared dependencies change.
STAMP := $(VENV)/.corral-installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1

E2B_NODE := tests/integration/e2b_node
AGENT_CLI := tests/integration/agent_cli

.PHONY: help install deps venv agent templates run test pytest lint bench e2b-node agent-cli

help:
	@echo "make install    apt packages, .venv with corral, the in-sandbox agent"
	@echo "make templates  build the minimal and base templates into DATA_DIR=$(DATA_DIR) (once)"
	@echo "make run        install + templates + corral server on $(LISTEN) (foreground)"
	@echo "make test       install + templates + pytest + ruff + mypy"
	@echo "make lint       ruff + mypy"
	@echo "make bench      peer floor (runc/crun/docker/podman) and corral benchmarks"

install: deps venv agent

deps:
	bash scripts/install-deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

agent: venv
	$(PY) -c 'from corral.agent.build import agent_binary_path; print(agent_binary_path())'

templates: venv
	$(PY) -m corral.templates build minimal base --quiet --data-dir $(DATA_DIR)

run: install templates
	exec $(VENV)/bin/corral server --listen $(LISTEN) --data-dir $(DATA_DIR)

# The e2b npm package at the version its lock file pins, for the JS compatibility test.
$(E2B_NODE)/node_modules/.package-lock.json: $(E2B_NODE)/package-lock.json | deps
	cd $(E2B_NODE) && npm ci --no-audit --no-fund --loglevel=error

e2b-node: $(E2B_NODE)/node_modules/.package-lock.json

# Claude Code's native linux-x64 binary (one ~400 MB file) at the version its lock file pins, for
# the secrets example test and examples/agent_with_secret.py: the platform package alone, not
# the launcher package, whose postinstall script would only copy this same file into place.
$(AGENT_CLI)/node_modules/.package-lock.json: $(AGENT_CLI)/package-lock.json | deps
	cd $(AGENT_CLI) && npm ci --no-audit --no-fund --loglevel=error

agent-cli: $(AGENT_CLI)/node_modules/.package-lock.json

# Tests reuse the templates built above instead of building their own.
pytest: install templates e2b-node agent-cli
	rc=0; CORRAL_TEST_DATA_DIR=$(DATA_DIR) timeout --signal=INT --kill-after=60 $(PYTEST_TIMEOUT) \
		$(VENV)/bin/pytest -q || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

test: pytest lint

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install templates
	bash bench/setup-peers.sh
	$(PY) -m bench.peers --data-dir $(DATA_DIR)
	$(PY) -m bench.bench_sandbox --templates-from $(DATA_DIR)
	$(PY) -m bench.bench_network --templates-from $(DATA_DIR)
	$(PY) -m bench.bench_pause --templates-from $(DATA_DIR)
	$(PY) -m bench.bench_snapshot --templates-from $(DATA_DIR)
	$(PY) -m bench.bench_microvm --templates-from $(DATA_DIR)
	$(PY) -m bench.bench_e2b --templates-from $(DATA_DIR)
