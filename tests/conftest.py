"""Shared fixtures: real PostgreSQL, MariaDB, Redis and SQLite, each test in its own schema/db/keys.

A test that needs a service fails (never skips) when the service is down,
under ``CI=true`` and under ``make test`` (``COUNTERFILL_TEST_SERVICES=required``);
only a developer who opts out (``make test SERVICES=optional``, or plain
``pytest`` outside CI) gets a skip with the reason.

Hypothesis profiles: ``ci`` (derandomized, selected by ``CI=true`` and by
``make test``) and ``dev`` (random, more examples; the default of a plain
``pytest`` elsewhere). ``HYPOTHESIS_PROFILE`` picks one explicitly. See
docs/testing.md.
"""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings

PG_ADMIN_URL = os.environ.get(
    "COUNTERFILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_BASE = os.environ.get("COUNTERFILL_TEST_REDIS", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("COUNTERFILL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
MARIADB_ADMIN_URL = os.environ.get(
    "COUNTERFILL_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/?charset=utf8mb4"
)

#: Every database the library supports; ``db_url`` runs a test once on each.
DATABASES = ["sqlite", "postgresql", "mariadb"]
#: The server databases (concurrency, workers): ``server_url`` runs a test on each.
SERVERS = ["postgresql", "mariadb"]


def is_deadlock(exc: BaseException) -> bool:
    """Whether a database error is a deadlock (PostgreSQL 40P01, MariaDB/MySQL 1213)."""
    orig = getattr(exc, "orig", None)
    if type(orig).__name__ == "DeadlockDetected":
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] == 1213


# COUNTERFILL_TEST_GC=aggressive (make test-gc): collect garbage at nearly every
# allocation, so that anything held only weakly (mapped classes in a declarative
# registry, event listeners) disappears as early as it ever could.
# Thresholds alone rarely trigger a full collection, so the entry points that
# resolve counters or flush also collect first.
def _collecting_first(fn):  # noqa: ANN001, ANN202 - a plain wrapper
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        gc.collect()
        return fn(*args, **kwargs)

    return wrapper


if os.environ.get("COUNTERFILL_TEST_GC") == "aggressive":
    from sqlalchemy.orm import Session, registry

    import alembic_counterfill
    import alembic_counterfill.counters

    gc.set_threshold(1, 1, 1)
    alembic_counterfill.counters_of = _collecting_first(alembic_counterfill.counters_of)
    alembic_counterfill.counters.counters_of = alembic_counterfill.counters_of
    registry.configure = _collecting_first(registry.configure)
    Session.flush = _collecting_first(Session.flush)

IN_CI = os.environ.get("CI", "").lower() == "true"
SERVICES_REQUIRED = IN_CI or os.environ.get("COUNTERFILL_TEST_SERVICES", "") == "required"

# One key prefix per test run: the suite never touches another run's (or app's) Redis keys.
RUN_ID = uuid.uuid4().hex[:10]

# The state machines' examples are slow (real databases): no deadline, and the
# too_slow check off; every other health check stays on. No explain phase: it
# traces every line of SQLAlchemy and turns a found failure into a timeout.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "phases": _PHASES,
    "print_blob": True,
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("dev", **_COMMON)
# A first failure, fast: no shrinking (for debugging a red run).
settings.register_profile("quick", **{**_COMMON, "phases": (Phase.generate,)})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))
#: Examples per state-machine test are multiplied by this in the dev profile (longer, random).
EXAMPLES_FACTOR = 1 if settings.default.derandomize else 2


def unavailable(what: str, exc: BaseException) -> None:
    """Fail when services are required (CI, make test), skip elsewhere: never pass silently."""
    msg = f"{what} unreachable: {exc}"
    if SERVICES_REQUIRED:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    """An engine on the shared test database, used to create and drop per-test schemas."""
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        unavailable("PostgreSQL", exc)
    yield engine
    engine.dispose()


@contextlib.contextmanager
def pg_schema_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped on exit."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with pg_admin.connect() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema of this test's own."""
    with pg_schema_url(pg_admin) as url:
        yield url


@pytest.fixture(scope="session")
def mariadb_admin() -> Iterator[sa.Engine]:
    """An engine on the MariaDB server, used to create and drop per-test databases."""
    engine = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        unavailable("MariaDB", exc)
    yield engine
    engine.dispose()


@contextlib.contextmanager
def mariadb_database_url(mariadb_admin: sa.Engine) -> Iterator[str]:
    """A MariaDB URL on a fresh database, dropped on exit."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with mariadb_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield mariadb_admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        drop_mariadb_database(mariadb_admin, name)


@pytest.fixture
def mariadb_url(mariadb_admin: sa.Engine) -> Iterator[str]:
    """A MariaDB URL on a fresh database of this test's own."""
    with mariadb_database_url(mariadb_admin) as url:
        yield url


def drop_mariadb_database(admin: sa.Engine, name: str) -> None:
    """Drop a test database, first ending sessions a failed test left open on it.

    A session idle in a transaction holds a metadata lock that would make the
    DROP wait forever.
    """
    with admin.connect() as conn:
        ids = conn.execute(
            sa.text("select id from information_schema.processlist where db = :db"), {"db": name}
        ).scalars()
        for session_id in ids:
            with contextlib.suppress(sa.exc.DBAPIError):  # it ended meanwhile
                conn.execute(sa.text("kill :id"), {"id": session_id})
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")


@contextlib.contextmanager
def own_database(request: pytest.FixtureRequest, name: str, tmp_dir: Path) -> Iterator[str]:
    """A URL on a fresh database of ``name`` (one of :data:`DATABASES`), dropped on exit.

    For fixtures wider than one test (module-scoped projects), which cannot use
    the per-test URL fixtures.
    """
    if name == "sqlite":
        yield f"sqlite:///{tmp_dir / 'app.db'}"
    elif name == "mariadb":
        with mariadb_database_url(request.getfixturevalue("mariadb_admin")) as url:
            yield url
    else:
        with pg_schema_url(request.getfixturevalue("pg_admin")) as url:
            yield url


def server_url_of(request: pytest.FixtureRequest, name: str) -> str:
    """The per-test URL fixture of database ``name`` (one of :data:`DATABASES`)."""
    return request.getfixturevalue(f"{'pg' if name == 'postgresql' else name}_url")


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on PostgreSQL and once on MariaDB (databases with concurrent writers)."""
    return server_url_of(request, request.param)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A file-backed SQLite database of this test's own."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=DATABASES)
def db_url(request) -> str:
    """Run the test once on SQLite, once on PostgreSQL and once on MariaDB."""
    return server_url_of(request, request.param)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on ``db_url``, disposed after the test."""
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


_redis_tests = iter(range(1, 1_000_000))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL whose Dramatiq keys carry a namespace of this test's own, deleted after it.

    ``?namespace=`` is read by the library's broker factory (docs/cli.md): the
    test never flushes a database, so a demo or another project sharing the
    Redis server keeps its keys.
    """
    import redis

    namespace = f"cf-test-{RUN_ID}-{next(_redis_tests)}"
    client = redis.Redis.from_url(REDIS_BASE)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover
        unavailable("Redis", exc)
    yield f"{REDIS_BASE.rstrip('/')}/0?namespace={namespace}"
    delete_namespace(client, namespace)
    client.close()


def delete_namespace(client: object, namespace: str) -> int:
    """Delete every key of ``namespace`` (and only those); return how many there were."""
    keys = list(client.scan_iter(match=f"{namespace}:*", count=500))  # type: ignore[attr-defined]
    if keys:
        client.delete(*keys)  # type: ignore[attr-defined]
    return len(keys)


@pytest.fixture(params=DATABASES)
def run_machine(request):  # noqa: ANN201 - returns the runner below
    """Run a CounterStateMachine subclass (with a ``url`` attribute) on this param's database."""
    url = server_url_of(request, request.param)
    if request.param == "postgresql":
        # The machine's sessions share one thread: a write waiting on the other's lock
        # would wait forever. A lock timeout turns that bug into a failure.
        parsed = sa.make_url(url)
        options = f"{parsed.query.get('options', '')} -c lock_timeout=20s".strip()
        url = parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)

    def run(machine: type, *, max_examples: int, steps: int = 30) -> Any:
        from alembic_counterfill.machine import run_counter_machine

        bound = type(machine.__name__, (machine,), {"url": url})
        examples = max_examples * EXAMPLES_FACTOR
        tally = run_counter_machine(
            bound,
            settings=settings(max_examples=examples, stateful_step_count=steps),
        )
        print(tally.report())  # shown with -s or -rP: what the run exercised
        return tally

    run.url = url  # type: ignore[attr-defined]  # which database this param runs on
    return run


@pytest.fixture
def no_inline_folding() -> Iterator[None]:
    """Buffered-counter tests fold by hand: "pending" is a state they control."""
    from alembic_counterfill.folding import configure_folding

    configure_folding(inline=False)
    yield
    configure_folding(inline=True)
