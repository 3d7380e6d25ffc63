"""Bookkeeping tables created by the previous release: `status`, `verify`, `enqueue` upgrade them.

The previous release's tables are made by taking today's and dropping what it
lacked (the columns below and the workers table), as an install that upgraded
the library without running the new `enqueue` or a worker would have them.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from backfill_project import Project, drift, seed, wait_for

from alembic_counterfill import progress

pytestmark = pytest.mark.timeout(180)

#: Columns the bookkeeping tables of the previous release did not have.
NEW_COLUMNS = {
    "counterfill_counters": ["fingerprint", "definition"],
    "counterfill_runs": [
        "fingerprints",
        "chunk_size",
        "pinned",
        "seconds_per_parent",
        "pacing_history",
        "parents_total",
        "parents_done",
        "window_started_at",
        "window_parents",
        "window_rate",
        "last_batch_at",
        "throttle_reason",
        "throttled_at",
        "paused_at",
        "max_rows_per_second",
        "rate_next_at",
    ],
    "counterfill_batches": ["refusals", "cursor", "sends"],
}


def _as_previous_release(engine: sa.Engine) -> None:
    """Drop what the previous release's bookkeeping tables lacked."""
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        for table, columns in NEW_COLUMNS.items():
            present = {c["name"] for c in sa.inspect(conn).get_columns(table)}
            for column in columns:
                if column in present:
                    ops.drop_column(table, column)
        conn.execute(sa.text("DROP TABLE IF EXISTS counterfill_workers"))
    with engine.connect() as conn:
        assert len(progress.outdated_columns(conn)) == sum(map(len, NEW_COLUMNS.values()))


def _current(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return progress.outdated_columns(conn) == []


@pytest.fixture
def db(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def test_status_verify_and_enqueue_work_on_the_previous_releases_tables(
    tmp_path: Path, db_url: str, db: sa.Engine
) -> None:
    seed(db, users=120)
    project = Project(tmp_path / "p", db_url)  # no broker: enqueue runs the batches here

    _as_previous_release(db)
    result = project.cli("status", "--json")
    assert result.exit_code == 0, result.output
    assert {s["state"] for s in json.loads(result.output) if s["counter"].startswith("users.")} == {
        progress.PENDING
    }
    assert _current(db)

    _as_previous_release(db)
    result = project.cli("status")
    assert result.exit_code == 0, result.output
    assert "pending" in result.output and _current(db)

    _as_previous_release(db)
    result = project.cli("verify")  # pending counters are left out: nothing to check yet
    assert result.exit_code == 0, result.output
    assert _current(db)

    _as_previous_release(db)
    result = project.cli("enqueue", "--wait")
    assert result.exit_code == 0, result.output
    assert _current(db)
    assert drift(db) == []  # independent COUNT(*) per parent


def _upgrade_while_held(
    engine: sa.Engine,
    admin: sa.Engine,
    hold: Callable[[sa.Connection], Any],
    waiting: Callable[[Any], bool],
    what: str,
) -> None:
    """Three upgraders start while ``hold`` keeps them waiting; all succeed once it is released.

    ``hold(holder)`` takes the lock on a connection of ``admin`` and returns
    what ``waiting`` needs to tell when all three wait (``what`` names that).
    """
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            progress.upgrade_tables(engine)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, daemon=True) for _ in range(3)]
    holder = admin.connect()
    try:
        seed(admin, users=10)
        _as_previous_release(admin)
        held = hold(holder)
        for t in threads:
            t.start()
        wait_for(lambda: waiting(held), what=what)
        holder.rollback()
    finally:
        holder.rollback()
        holder.close()
        for t in threads:
            t.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert _current(admin)
    finally:
        engine.dispose()
        admin.dispose()


def test_concurrent_upgrades_of_old_tables_serialise(pg_url: str) -> None:
    """Several processes upgrading at once: each waits for the lock, none fails."""
    name = f"cf-upgrade-{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(pg_url, connect_args={"application_name": name}, pool_size=8)
    admin = sa.create_engine(pg_url)

    def hold(holder: sa.Connection) -> None:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(progress._DDL_LOCK)))

    def waiting(_: None) -> bool:
        with admin.connect() as conn:
            n = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND NOT l.granted "
                    "AND a.application_name = :name"
                ),
                {"name": name},
            ).scalar_one()
        return n == 3

    _upgrade_while_held(engine, admin, hold, waiting, "three upgraders to wait on the lock")


def test_concurrent_upgrades_of_old_tables_on_mariadb_all_succeed(mariadb_url: str) -> None:
    """Several processes upgrading at once on MariaDB: each finds the columns missing, none fails.

    No lock serialises them there (MariaDB's DDL commits at once): an upgrader
    whose ``ADD COLUMN`` meets a column another one added meanwhile moves on.
    A test transaction that has read ``counterfill_counters`` holds its
    metadata lock, so all three upgraders decide what is missing, then wait
    at their first ``ALTER TABLE``; once it ends, they all alter the same
    tables at the same time.
    """
    engine = sa.create_engine(mariadb_url, pool_size=8)
    admin = sa.create_engine(mariadb_url)

    def hold(holder: sa.Connection) -> Any:
        holder.execute(sa.text("SELECT count(*) FROM counterfill_counters"))  # its metadata lock
        return holder.execute(sa.text("SELECT connection_id()")).scalar_one()

    def waiting(me: Any) -> bool:
        with admin.connect() as conn:
            n = conn.execute(
                sa.text(
                    "SELECT count(*) FROM information_schema.processlist "
                    "WHERE db = database() AND id NOT IN (connection_id(), :me) "
                    "AND state = 'Waiting for table metadata lock' "
                    "AND info LIKE 'ALTER TABLE counterfill_counters %'"
                ),
                {"me": me},
            ).scalar_one()
        return n == 3

    what = "three upgraders to wait at their ALTER TABLE"
    _upgrade_while_held(engine, admin, hold, waiting, what)


def test_status_says_in_one_line_what_to_do_when_the_upgrade_is_refused(
    tmp_path: Path, pg_url: str, pg_admin: sa.Engine
) -> None:
    """A database user that may not ALTER the old tables: one line naming the fix."""
    engine = sa.create_engine(pg_url)
    role = f"cf_ro_{uuid.uuid4().hex[:8]}"
    schema = sa.make_url(pg_url).query["options"].split("=", 1)[1]
    try:
        seed(engine, users=10)
        _as_previous_release(engine)
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
            conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            conn.execute(sa.text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'))
        url = sa.make_url(pg_url).set(username=role)
        project = Project(tmp_path / "p", url.render_as_string(hide_password=False))
        result = project.cli("status")
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith(
            "Error: the bookkeeping tables were created by an older alembic_counterfill"
        )
        assert "counterfill_counters.fingerprint" in lines[0]
        assert "run `alembic counterfill enqueue` once as a database user allowed" in lines[0]
        assert "Traceback" not in result.output
        assert not _current(engine)  # nothing half-done
    finally:
        engine.dispose()
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))


def test_status_on_mariadb_says_in_one_line_what_to_do_when_the_upgrade_is_refused(
    tmp_path: Path, mariadb_url: str, mariadb_admin: sa.Engine
) -> None:
    """A MariaDB user with SELECT only on the database: one line naming the fix."""
    engine = sa.create_engine(mariadb_url)
    user = f"cf_ro_{uuid.uuid4().hex[:8]}"
    database = sa.make_url(mariadb_url).database
    try:
        seed(engine, users=10)
        _as_previous_release(engine)
        with mariadb_admin.connect() as conn:
            # Test-made names (hex): MariaDB takes no bound parameters in account statements.
            conn.execute(sa.text(f"CREATE USER '{user}'@'%'"))
            conn.execute(sa.text(f"GRANT SELECT ON `{database}`.* TO '{user}'@'%'"))
        url = sa.make_url(mariadb_url).set(username=user)
        project = Project(tmp_path / "p", url.render_as_string(hide_password=False))
        result = project.cli("status")
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith(
            "Error: the bookkeeping tables were created by an older alembic_counterfill"
        )
        assert "counterfill_counters.fingerprint" in lines[0]
        assert "ALTER command denied" in lines[0]
        assert "run `alembic counterfill enqueue` once as a database user allowed" in lines[0]
        assert "Traceback" not in result.output
        assert not _current(engine)  # nothing half-done
    finally:
        engine.dispose()
        with mariadb_admin.connect() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))


def test_the_application_reads_counters_from_the_previous_releases_tables(
    db: sa.Engine,
) -> None:
    """counter_value() on old tables: no error, no ALTER; live while pending, cached once active."""
    import backfill_models as m
    from sqlalchemy.orm import Session

    from alembic_counterfill import read

    seed(db, users=20)
    _as_previous_release(db)
    with db.connect() as conn:
        truth = conn.execute(
            sa.text("SELECT count(*) FROM follows WHERE followed_id = 7")
        ).scalar_one()
    read.clear_cache()
    try:
        with Session(db) as s:
            user = s.get(m.User, 7)
            assert user is not None
            assert read.counter_value(s, user, "followers_count") == truth  # pending: live
            cached = user.followers_count
        with db.begin() as conn:
            c = sa.table("counterfill_counters", sa.column("key"), sa.column("state"))
            conn.execute(
                sa.update(c).where(c.c.key == "users.followers_count").values(state="active")
            )
        read.clear_cache()
        with Session(db) as s:
            user = s.get(m.User, 7)
            assert user is not None
            assert read.counter_value(s, user, "followers_count") == cached  # active: the column
    finally:
        read.clear_cache()
    assert not _current(db)  # reading never altered the tables
