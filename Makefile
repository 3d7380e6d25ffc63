# Quick start: `make demo` (the main job, end to end, on SQLite with no broker server)
# and `make test` (the whole suite against real PostgreSQL, Redis and RabbitMQ).
# Each target creates .venv and installs what it needs on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

USERS ?= 100000
DATABASE_URL ?=
BROKER_URL ?=

.PHONY: demo test lint services install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e . pytest pytest-timeout greenlet "hypothesis>=6.100" "ruff>=0.6" "mypy>=1.10" "import-linter>=2.17"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@if [ -n "$(DATABASE_URL)$(BROKER_URL)" ]; then $(MAKE) --no-print-directory services; fi
	$(PY) -m example_project demo --users $(USERS) \
		$(if $(DATABASE_URL),--database-url "$(DATABASE_URL)") \
		$(if $(BROKER_URL),--broker-url "$(BROKER_URL)")

services:
	@bash scripts/services.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check alembic_counterfill example_project tests bench
	$(VENV)/bin/ruff format --check alembic_counterfill example_project tests bench
	$(VENV)/bin/mypy alembic_counterfill
	$(VENV)/bin/lint-imports

test: $(STAMP) services lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
