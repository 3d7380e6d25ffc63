"""``op.request_counter_backfill`` / ``op.cancel_counter_backfill``: execute, render, compare.

In-process on real SQLite, PostgreSQL and MariaDB through alembic's own
``MigrationContext`` and ``Operations`` (the end-to-end module drives the same
ops through the ``alembic`` executable).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import render_python_code
from alembic.operations import Operations
from alembic.operations import ops as alembic_ops
from alembic.runtime.migration import MigrationContext

from alembic_counterfill import autogen, progress
from alembic_counterfill.declaration import INFO_KEY, CounterSpec
from alembic_counterfill.ops import CancelCounterBackfillOp, RequestCounterBackfillOp


def _rows(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        if not progress.has_tables(conn):
            return []
        result = conn.execute(sa.select(progress.counters_table).order_by("key"))
        return [dict(r) for r in result.mappings()]


def _offline(dialect: str, **opts: Any) -> tuple[Operations, io.StringIO]:
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name=dialect, opts={"as_sql": True, "output_buffer": buffer, **opts}
    )
    return Operations(context), buffer


def test_request_creates_tables_on_demand_and_records_pending(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        assert not progress.has_tables(conn)
        Operations(MigrationContext.configure(conn)).request_counter_backfill(
            "users", "followers_count"
        )
    (row,) = _rows(engine)
    assert row["key"] == "users.followers_count"
    assert (row["table_name"], row["column_name"], row["schema_name"]) == (
        "users",
        "followers_count",
        None,
    )
    assert row["state"] == progress.PENDING
    assert row["requested_at"] is not None


def test_request_records_the_schema_but_keys_by_table_and_column(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).request_counter_backfill(
            "users", "posts_count", schema="accounts"
        )
    (row,) = _rows(engine)
    assert (row["key"], row["schema_name"]) == ("users.posts_count", "accounts")


def test_request_again_resets_the_counter_to_pending(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).request_counter_backfill("users", "c")
        conn.execute(sa.update(progress.counters_table).values(state=progress.ACTIVE))
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).request_counter_backfill("users", "c")
    assert [(r["key"], r["state"]) for r in _rows(engine)] == [("users.c", progress.PENDING)]


def test_cancel_removes_only_that_request(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.request_counter_backfill("users", "a")
        op.request_counter_backfill("users", "b")
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).cancel_counter_backfill("users", "a")
    assert [r["key"] for r in _rows(engine)] == ["users.b"]


def test_cancel_without_bookkeeping_tables_creates_nothing(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).cancel_counter_backfill("users", "a")
    with engine.connect() as conn:
        assert not progress.has_tables(conn)


def test_request_is_part_of_the_migration_transaction(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            Operations(MigrationContext.configure(conn)).request_counter_backfill("users", "c")
            raise RuntimeError("the migration fails after the request")
        # PostgreSQL DDL is transactional: neither the tables nor the row survive.
        with engine.connect() as conn:
            assert not progress.has_tables(conn)
    finally:
        engine.dispose()


def test_on_mariadb_a_failed_migration_keeps_its_ddl_but_not_its_request(mariadb_url: str) -> None:
    """MariaDB commits DDL at once: the column and bookkeeping tables stay, the request does not.

    The request row is written after every DDL statement of the op (the
    tables' ``CREATE``), inside the migration's transaction, so a migration
    failing after it rolls it back; the column it added survives, as with
    any Alembic migration on MySQL (docs/databases.md, "Migrations").
    """
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))
        with pytest.raises(RuntimeError), engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn))
            op.add_column("users", sa.Column("c", sa.Integer, server_default="0", nullable=False))
            op.request_counter_backfill("users", "c")
            raise RuntimeError("the migration fails after the request")
        with engine.connect() as conn:
            assert "c" in {c["name"] for c in sa.inspect(conn).get_columns("users")}
            assert progress.has_tables(conn)  # created by the request, committed by MariaDB
            assert progress.counter_rows(conn) == {}  # the request went with the transaction
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_offline_renders_ddl_once_and_literal_statements(dialect: str) -> None:
    op, buffer = _offline(dialect)  # no literal_binds: the op renders values itself
    op.request_counter_backfill("users", "followers_count")
    op.request_counter_backfill("users", "posts_count")
    op.cancel_counter_backfill("users", "posts_count")
    sql = buffer.getvalue()
    assert sql.count("CREATE TABLE IF NOT EXISTS counterfill_counters") == 1
    assert sql.count("CREATE TABLE IF NOT EXISTS counterfill_runs") == 1
    assert sql.count("CREATE TABLE IF NOT EXISTS counterfill_batches") == 1
    assert sql.count("CREATE INDEX IF NOT EXISTS ix_counterfill_batches_run_id") == 1
    now = "now()" if dialect == "postgresql" else "CURRENT_TIMESTAMP"
    assert (
        "VALUES ('users.followers_count', 'users', 'followers_count', NULL, 'pending', "
        f"{now}, {now}, NULL, NULL);"
    ) in sql
    deletes = [line for line in sql.splitlines() if line.startswith("DELETE")]
    assert [line.rsplit("= ", 1)[1] for line in deletes] == [
        "'users.followers_count';",
        "'users.posts_count';",
        "'users.posts_count';",
    ]
    assert ":key" not in sql and "%(" not in sql


def test_offline_mysql_script_is_plain_mysql() -> None:
    op, buffer = _offline("mysql")
    op.request_counter_backfill("users", "followers_count")
    op.cancel_counter_backfill("users", "followers_count")
    sql = buffer.getvalue()
    assert sql.count("CREATE TABLE IF NOT EXISTS counterfill_batches") == 1
    assert "CREATE INDEX" not in sql  # MySQL 8 has no IF NOT EXISTS there; InnoDB indexes FKs
    assert "`key` VARCHAR(255) NOT NULL" in sql and "AUTO_INCREMENT" in sql
    assert (
        "VALUES ('users.followers_count', 'users', 'followers_count', NULL, 'pending', "
        "now(), now(), NULL, NULL);"
    ) in sql
    assert (
        "DELETE FROM counterfill_counters "
        "WHERE counterfill_counters.`key` = 'users.followers_count';" in sql
    )
    assert ":key" not in sql and "%(" not in sql and "%s" not in sql


def test_offline_mysql_script_runs_on_mariadb(mariadb_url: str) -> None:
    op, buffer = _offline("mysql")
    op.request_counter_backfill("users", "followers_count")
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.begin() as conn:
            for statement in buffer.getvalue().split(";\n"):
                if statement.strip():
                    conn.exec_driver_sql(statement.replace("%", "%%"))
        with engine.connect() as conn:
            assert progress.counter_rows(conn)["users.followers_count"]["state"] == "pending"
    finally:
        engine.dispose()


def test_offline_escapes_quotes_in_names() -> None:
    op, buffer = _offline("postgresql", literal_binds=True)
    op.request_counter_backfill("o'neil", "count:x")
    assert "'o''neil.count:x', 'o''neil', 'count:x'" in buffer.getvalue()


def test_ops_reverse_each_other_and_list_as_diffs() -> None:
    request = RequestCounterBackfillOp("users", "c", schema="s")
    cancel = request.reverse()
    assert isinstance(cancel, CancelCounterBackfillOp)
    assert (cancel.table_name, cancel.column_name, cancel.schema) == ("users", "c", "s")
    assert isinstance(cancel.reverse(), RequestCounterBackfillOp)
    assert request.to_diff_tuple() == ("request_counter_backfill", "s", "users", "c")
    assert cancel.to_diff_tuple() == ("cancel_counter_backfill", "s", "users", "c")


def test_render_with_schema_and_custom_prefix() -> None:
    ops = alembic_ops.UpgradeOps(
        ops=[
            RequestCounterBackfillOp("users", "c", schema="accounts"),
            CancelCounterBackfillOp("users", "d"),
        ]
    )
    code = render_python_code(ops, alembic_module_prefix="migrate.")
    assert "migrate.request_counter_backfill('users', 'c', schema='accounts')" in code
    assert "migrate.cancel_counter_backfill('users', 'd')" in code


def _counter_column(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.Integer, info={INFO_KEY: CounterSpec(target="Follow.followed_id")})


def test_compare_adds_requests_after_added_counter_columns_only() -> None:
    users = alembic_ops.ModifyTableOps(
        "users",
        [
            alembic_ops.AddColumnOp("users", _counter_column("followers_count")),
            alembic_ops.AddColumnOp("users", sa.Column("nickname", sa.String(20))),
        ],
    )
    created = alembic_ops.CreateTableOp("forums", [sa.Column("id", sa.Integer, primary_key=True)])
    upgrade = alembic_ops.UpgradeOps(ops=[created, users])
    autogen.compare(None, upgrade, {None})
    assert upgrade.ops[:2] == [created, users]
    (request,) = upgrade.ops[2:]
    assert isinstance(request, RequestCounterBackfillOp)
    assert (request.table_name, request.column_name) == ("users", "followers_count")


def test_compare_removes_every_op_on_bookkeeping_tables() -> None:
    kept = alembic_ops.DropTableOp("legacy")
    upgrade = alembic_ops.UpgradeOps(
        ops=[
            alembic_ops.ModifyTableOps(
                "counterfill_batches",
                [alembic_ops.DropIndexOp("ix_counterfill_batches_run_id", "counterfill_batches")],
            ),
            alembic_ops.DropTableOp("counterfill_batches"),
            alembic_ops.DropTableOp("counterfill_runs"),
            alembic_ops.CreateTableOp("counterfill_counters", []),
            kept,
        ]
    )
    autogen.compare(None, upgrade, {None})
    assert upgrade.ops == [kept]


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite", "mysql"])
def test_offline_request_records_the_definition_with_percent_signs_intact(dialect: str) -> None:
    import definition_models

    op, buffer = _offline(dialect, target_metadata=definition_models.Base.metadata)
    op.request_counter_backfill("boards", "drafts_count")
    sql = buffer.getvalue()
    assert "'e4dc553d60b1c1dd'" in sql  # the fingerprint of the models' definition
    # One "%" per "%" of the LIKE pattern: no paramstyle doubling in a plain SQL script.
    assert "NOT LIKE ''%''''draft''''%''" in sql
