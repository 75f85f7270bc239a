# Loyalist — every command installs what it needs on first use (venv, apt packages, Maven jars, npm).
# Ports, namespaces and paths come from LOYALIST_* environment variables (see loyalist/settings.py).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .loyalist/stamps
export LOYALIST_HOME ?= $(CURDIR)/.loyalist

.PHONY: help deps up down status test test-unit lint lint-helm demo bench chaos clean

help:
	@echo "make up      start Kafka, Cassandra, Redis, Prometheus, SMTP sink and the five services"
	@echo "make down    stop what 'make up' started"
	@echo "make demo    bring the stack up and run the end-to-end demo"
	@echo "make test    lint + unit + integration tests against the real local stack"
	@echo "make bench   benchmarks (figures next to raw baselines)"
	@echo "make chaos   kill every process in turn under load; verify nothing lost or duplicated"
	@echo "make lint    ruff, mypy, import contracts, compose/helm/prometheus checks"

# ---- installs ------------------------------------------------------------------------------------
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

# Debian packages: Redis, Prometheus (promtool), Chromium for the tracker's browser test.
$(STAMP)/apt:
	@mkdir -p $(STAMP)
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "installing Debian packages: redis-server prometheus chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server prometheus chromium >/dev/null; fi
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deps: $(VENV)/.installed $(STAMP)/apt node_modules/.installed

# ---- the stack -----------------------------------------------------------------------------------
up: deps
	$(PY) -m loyalist.devstack up

down:
	@test -x $(PY) && $(PY) -m loyalist.devstack down || true

status: deps
	$(PY) -m loyalist.devstack status

# ---- quality -------------------------------------------------------------------------------------
lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy loyalist services demo bench
	$(VENV)/bin/lint-imports
	$(PY) -m loyalist.checks.compose docker-compose.yml
	$(MAKE) --no-print-directory lint-helm

# Helm from the Go module proxy (a cold build takes ~3 minutes; skipped once the binary exists).
HELM := $(shell go env GOPATH 2>/dev/null || echo $(HOME)/go)/bin/helm
$(HELM):
	go install helm.sh/helm/v3/cmd/helm@v3.19.0

# helm lint --strict + helm template (default and ci/*-values.yaml) + offline Kubernetes schema validation.
lint-helm: deps $(HELM)
	$(PY) -m loyalist.checks.helm --helm $(HELM)

test-unit: deps
	$(PY) -m pytest -m "not integration" -q

# Each test area runs as its own pytest session, so in its own namespace (topics, keyspace, Redis keys) with
# its own service processes: areas that start replicas of a service never share a consumer group.
TEST_AREAS := core ingest profile segmenter journeys notify loyalty ops fuzz chaos

test: lint
	@failed=""; \
	$(PY) -m pytest -q loyalist services bench || failed="$$failed packages"; \
	for area in $(TEST_AREAS); do \
	  echo "== tests/$$area"; \
	  $(PY) -m pytest -q tests/$$area || failed="$$failed $$area"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: FAILED in:$$failed"; exit 1; fi; \
	echo "make test: every area passed"

# ---- proof ---------------------------------------------------------------------------------------
demo: up
	$(PY) -m demo

bench: up
	$(PY) -m bench

# Kill -9 each service, then Kafka, Cassandra and Redis of a private stack, under load (make test runs a short form).
chaos: deps
	LOYALIST_CHAOS=full $(PY) -m pytest tests/chaos -q -s -m integration

clean: down
	rm -rf .loyalist
