"""Shared fixtures: real PostgreSQL, MariaDB, Redis and SQLite, each test in its own schema/db.

A test that needs a service fails (never skips) when the service is down and
``CI=true``; outside CI it skips with the reason, so a laptop without Redis can
still run the rest.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

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


def unavailable(what: str, exc: BaseException) -> None:
    """Fail in CI, skip elsewhere: a missing service must never pass silently in CI."""
    msg = f"{what} unreachable: {exc}"
    if os.environ.get("CI", "").lower() == "true":
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


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema of this test's own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with pg_admin.connect() as conn:
        conn.execute(sa.schema.DropSchema(schema, cascade=True))


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


@pytest.fixture
def mariadb_url(mariadb_admin: sa.Engine) -> Iterator[str]:
    """A MariaDB URL on a fresh database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with mariadb_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    url = mariadb_admin.url.set(database=name)
    yield url.render_as_string(hide_password=False)
    drop_mariadb_database(mariadb_admin, name)


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


_redis_db = iter(range(1, 16))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL on a database number of this test's own, flushed before and after."""
    import redis

    try:
        db = next(_redis_db)
    except StopIteration:  # more than 15 redis tests: recycle, flushing keeps them apart
        globals()["_redis_db"] = iter(range(1, 16))
        db = next(_redis_db)
    url = f"{REDIS_BASE}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except Exception as exc:  # pragma: no cover
        unavailable("Redis", exc)
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(params=DATABASES)
def run_machine(request):  # noqa: ANN201 - returns the runner below
    """Run a CounterStateMachine subclass (with a ``url`` attribute) on this param's database."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    url = server_url_of(request, request.param)

    def run(machine: type, *, max_examples: int, steps: int = 30) -> None:
        bound = type(machine.__name__, (machine,), {"url": url})
        run_state_machine_as_test(
            bound,
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )

    return run
