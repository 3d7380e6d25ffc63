# Quick start: `make demo` (the main job, end to end, on SQLite with no broker server)
# and `make test` (the whole suite against real PostgreSQL, MariaDB, Redis and RabbitMQ).
# Each target creates .venv and installs what it needs on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Core install (SQLite, in-process backfills): all the demo needs on its own.
CORE_STAMP := $(VENV)/.installed-core
# Plus the drivers and brokers of the services the tests and the server demo use.
SERVICES_STAMP := $(VENV)/.installed-services
SERVICE_EXTRAS := postgresql,mysql,mysqlclient,redis,rabbitmq
# Plus the test and lint tools.
STAMP := $(VENV)/.installed
# A second virtualenv with every dependency at the lowest version pyproject.toml allows.
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
TEST_DEPS := pytest pytest-timeout "hypothesis>=6.100" asyncpg aiosqlite aiomysql greenlet

OLDEST_TESTS ?= tests/test_live.py tests/test_bulk_forms.py tests/test_orm_writes.py \
	tests/test_orm_inheritance.py tests/test_orm_joined_values.py tests/test_orm_sqlalchemy_internals.py \
	tests/test_async_sessions.py tests/test_alembic_end_to_end.py

USERS ?= 100000
DATABASE_URL ?=
BROKER_URL ?=
# `make test` fails a test whose service (PostgreSQL, Redis, RabbitMQ) is missing,
# as CI=true does; a developer opts out explicitly with `make test SERVICES=optional`.
SERVICES ?= required
# `make test` draws the same Hypothesis examples as CI (derandomized `ci` profile):
# a red run is reproducible. `make test HYPOTHESIS_PROFILE=dev` explores at random, twice as long.
HYPOTHESIS_PROFILE ?= ci

.PHONY: demo test test-gc test-oldest lint services install clean

$(CORE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(CORE_STAMP)

$(SERVICES_STAMP): $(CORE_STAMP)
	@bash scripts/services.sh mysqlclient-deps
	$(PY) -m pip install --quiet -e '.[$(SERVICE_EXTRAS)]'
	touch $(SERVICES_STAMP)

$(STAMP): $(SERVICES_STAMP)
	$(PY) -m pip install --quiet $(TEST_DEPS) "ruff>=0.6" "mypy>=1.10" "import-linter>=2.17"
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml scripts/oldest_pins.py
	@bash scripts/services.sh mysqlclient-deps
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) scripts/oldest_pins.py > $(OLDEST)/constraints.txt
	$(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/constraints.txt \
		-e '.[$(SERVICE_EXTRAS)]' $(TEST_DEPS)
	touch $(OLDEST_STAMP)

install: $(STAMP)

demo: $(CORE_STAMP)
	@if [ -n "$(DATABASE_URL)$(BROKER_URL)" ]; then $(MAKE) --no-print-directory $(SERVICES_STAMP) services; fi
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

test: $(STAMP) services lint test-oldest
	COUNTERFILL_TEST_SERVICES=$(SERVICES) HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(VENV)/bin/pytest -q

# Declarations and live maintenance with a garbage collection before every
# counter lookup and flush: anything held only weakly fails here, not by chance.
test-gc: $(STAMP) services
	COUNTERFILL_TEST_SERVICES=$(SERVICES) HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) \
		COUNTERFILL_TEST_GC=aggressive $(VENV)/bin/pytest -q \
		tests/test_declaration.py tests/test_live.py

# The live, bulk and alembic end-to-end tests against the oldest allowed dependencies.
test-oldest: $(OLDEST_STAMP) services
	$(OLDEST)/bin/python -c "from importlib.metadata import version as v; \
		print('oldest:', *(f'{p} {v(p)}' for p in \
		('sqlalchemy', 'alembic', 'dramatiq', 'psycopg', 'psycopg-binary', 'click')))"
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(OLDEST)/bin/pytest -q -p no:cacheprovider $(OLDEST_TESTS)

clean:
	rm -rf $(VENV) $(OLDEST) demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
