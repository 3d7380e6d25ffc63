"""Buffered (hot-parent) counters on SQLite, PostgreSQL and MariaDB: writes, exact reads, folds.

Judged against the test's own SQL (buffered_models.TRUTH_SQL): the exact value
(column + pending deltas) must equal COUNT/SUM at all times, and the column
alone after a fold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from backfill_project import Project, wait_for
from buffered_models import (
    Base,
    Follow,
    Post,
    User,
    column_drift,
    drift,
    pending_count,
    rows,
)
from sqlalchemy.orm import Session

from alembic_counterfill import (
    CounterDeclarationError,
    counter_cache,
    counter_value,
    counters_of,
)
from alembic_counterfill import fold as folding
from alembic_counterfill.folding import configure_folding
from alembic_counterfill.testing import find_drift

pytestmark = pytest.mark.usefixtures("no_inline_folding")


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        s.commit()
    yield engine


def fold_all(engine: sa.Engine) -> folding.FoldOutcome:
    return folding.fold(engine, counters_of(Base))


def value(engine: sa.Engine, uid: int, attr: str) -> int:
    with Session(engine) as s:
        return int(counter_value(s, s.get(User, uid), attr))


def assert_exact_then_fold(engine: sa.Engine) -> None:
    """Exact while pending, and the columns exact (nothing pending) after a fold."""
    assert drift(engine) == []
    for uid, name, _, _, actual in rows(engine):
        assert value(engine, uid, name) == actual
    fold_all(engine)
    assert pending_count(engine) == 0
    assert column_drift(engine) == []
    assert find_drift(engine, Base) == []


def test_deltas_table_is_created_with_the_models(db: sa.Engine) -> None:
    with db.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("counterfill_deltas_users")}
    assert columns == {
        "id",
        "parent_id",
        "created_at",
        "followers_count",
        "posts_count",
        "likes_total",
    }


def test_flush_writes_append_deltas_and_reads_stay_exact(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=2) for _ in range(3)])
        s.add_all([Post(id=1, author_id=2, published=True, likes=4), Post(id=2, author_id=3)])
        s.commit()
        user = s.get(User, 2)
        assert user is not None
        # The unbuffered counter moved at once; buffered columns wait for a fold.
        assert s.get(User, 1).following_count == 3  # type: ignore[union-attr]
        assert user.followers_count == 0 and user.likes_total == 0
        assert counter_value(s, user, "followers_count") == 3
        assert counter_value(s, user, "likes_total") == 4
        assert pending_count(db) >= 1
        assert column_drift(db) != [] and drift(db) == []
        post = s.get(Post, 1)
        assert post is not None
        post.author_id = 3  # FK move
        s.commit()
        post.published = False  # where= flip
        post.likes = 9  # sum change
        s.commit()
        s.delete(s.scalars(sa.select(Follow).limit(1)).one())
        s.commit()
        p2 = s.get(Post, 2)
        assert p2 is not None
        p2.published = True
        s.commit()
    assert_exact_then_fold(db)
    with Session(db) as s:
        user = s.get(User, 3)
        assert user is not None and user.likes_total == 9 and user.posts_count == 1


def test_rollback_leaves_no_delta(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add(Follow(follower_id=1, followed_id=2))
        s.flush()
        s.rollback()
    assert pending_count(db) == 0
    assert_exact_then_fold(db)


def test_reads_inside_the_writing_transaction_see_its_own_deltas(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=4) for _ in range(2)])
        user = s.get(User, 4)
        assert counter_value(s, user, "followers_count") == 2  # autoflushed, uncommitted
        s.rollback()
        assert counter_value(s, s.get(User, 4), "followers_count") == 0


def test_bulk_statements_keep_buffered_counters_exact(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Follow), [{"follower_id": 1, "followed_id": 5} for _ in range(4)])
        s.execute(
            sa.insert(Post),
            [{"author_id": 5, "published": True, "likes": k} for k in range(1, 6)],
        )
        s.commit()
        assert drift(db) == []
        s.execute(sa.delete(Follow).where(Follow.id <= 2))
        s.execute(sa.update(Post).where(Post.likes >= 4).values(author_id=4))  # FK move
        s.execute(sa.update(Post).where(Post.likes == 1).values(published=False))  # where flip
        s.execute(sa.update(Post).where(Post.likes == 2).values(likes=20))  # sum change
        s.commit()
        assert drift(db) == []
        s.execute(
            sa.insert(Follow).from_select(
                ["follower_id", "followed_id"],
                sa.select(User.id, sa.literal(3)).where(User.id <= 3),
            )
        )
        s.commit()
    assert_exact_then_fold(db)


def test_upsert_keeps_buffered_counters_exact(server_url: str) -> None:
    """``ON CONFLICT DO UPDATE`` (PostgreSQL) / ``ON DUPLICATE KEY UPDATE`` (MariaDB).

    One row of the statement moves an existing post to another author, the
    other is new.
    """
    from sqlalchemy.dialects import mysql, postgresql

    engine = sa.create_engine(server_url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i) for i in (1, 2)])
            s.commit()
            s.add(Post(id=1, author_id=1, published=True, likes=3))
            s.commit()
            rows = [
                {"id": 1, "author_id": 2, "published": True, "likes": 5},
                {"id": 2, "author_id": 1, "published": True, "likes": 4},
            ]
            stmt: Any
            if engine.dialect.name == "postgresql":
                ins = postgresql.insert(Post).values(rows)
                stmt = ins.on_conflict_do_update(
                    index_elements=[Post.id], set_={"author_id": ins.excluded.author_id}
                )
            else:
                mins = mysql.insert(Post).values(rows)
                stmt = mins.on_duplicate_key_update(author_id=mins.inserted.author_id)
            s.execute(stmt)
            s.commit()
        assert drift(engine) == []
        with engine.connect() as conn:  # the test's own truth: post 1 moved, post 2 is new
            authors = dict(conn.execute(sa.text("SELECT id, author_id FROM posts")).all())
        assert authors == {1: 2, 2: 1}
        assert_exact_then_fold(engine)
    finally:
        engine.dispose()


def test_fold_is_idempotent_and_reports_what_it_moved(db: sa.Engine) -> None:
    with Session(db) as s:
        for uid in (2, 3, 4):
            s.add(Follow(follower_id=1, followed_id=uid))
            s.commit()
    first = folding.fold(db, counters_of(Base), chunk=2)
    assert (first.parents, first.deltas) == (3, 3)
    assert first.transactions == 2 and len(first.lags) == 2
    again = fold_all(db)
    assert (again.parents, again.deltas) == (0, 0)
    assert column_drift(db) == []


def test_inline_folding_folds_after_commit(db: sa.Engine) -> None:
    configure_folding(inline=True, interval=0.05)
    with Session(db) as s:
        s.add_all([Follow(follower_id=2, followed_id=1) for _ in range(3)])
        s.commit()
    wait_for(lambda: pending_count(db) == 0, what="the inline fold")
    assert column_drift(db) == []


def test_verify_counts_pending_deltas_and_fix_removes_them(db: sa.Engine) -> None:
    from alembic_counterfill.verify import verify

    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=2) for _ in range(2)])
        s.commit()
    counters = counters_of(Base)
    assert verify(db, counters) == []  # pending deltas are not drift
    with db.begin() as conn:  # a raw write the library cannot see
        conn.execute(sa.text("UPDATE users SET followers_count = 7 WHERE id = 2"))
    (found,) = verify(db, counters)
    assert (found.id, found.column, found.cached, found.actual) == (2, "followers_count", 9, 2)
    verify(db, counters, fix=True)
    assert drift(db) == [] and column_drift(db) == []
    assert pending_count(db) == 0  # the fixed parent's deltas went with the recount


def test_backfill_recount_discards_the_range_deltas(db: sa.Engine, tmp_path: Path) -> None:
    with Session(db) as s:
        s.add_all([Follow(follower_id=i % 5 + 1, followed_id=i % 3 + 1) for i in range(12)])
        s.add_all([Post(author_id=4, published=True, likes=2) for _ in range(3)])
        s.commit()
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE users SET followers_count = 100, likes_total = -5"))
    assert drift(db) != []
    project = Project(tmp_path / "p", db.url.render_as_string(hide_password=False), batch_size=2)
    with open(project.ini, "a") as ini:
        ini.write("")
    text = Path(project.ini).read_text().replace("backfill_models:Base", "buffered_models:Base")
    Path(project.ini).write_text(text)
    result = project.cli("enqueue", "--all", "--inline")
    assert result.exit_code == 0, result.output
    assert drift(db) == [] and column_drift(db) == []
    assert pending_count(db) == 0


def test_cli_fold_and_status_show_pending_deltas(db: sa.Engine, tmp_path: Path) -> None:
    import json

    project = Project(tmp_path / "p", db.url.render_as_string(hide_password=False))
    text = Path(project.ini).read_text().replace("backfill_models:Base", "buffered_models:Base")
    Path(project.ini).write_text(text)
    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=2), Follow(follower_id=3, followed_id=4)])
        s.commit()
    status = {s["counter"]: s for s in json.loads(project.cli("status", "--json").output)}
    assert status["users.followers_count"]["pending_deltas"] == 2
    assert status["users.followers_count"]["oldest_delta_seconds"] >= 0
    assert status["users.following_count"]["pending_deltas"] is None
    assert "2 pending deltas" in project.cli("status").output
    bad = project.cli("fold", "users.following_count")
    assert bad.exit_code == 2 and "not buffered" in bad.output
    result = project.cli("fold", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["deltas"] == 2
    assert pending_count(db) == 0 and column_drift(db) == []
    again = project.cli("fold", "users.followers_count")
    assert again.exit_code == 0 and "folded 0 pending deltas" in again.output


def test_reserved_counter_name_is_refused() -> None:
    # A plain Table, not a declarative class: a class whose construction fails
    # would leave a half-built registry behind for configure_mappers().
    column = counter_cache("Child.parent_id", buffered=True, name="created_at").column
    with pytest.raises(CounterDeclarationError, match="cannot be named 'created_at'"):
        sa.Table("parents", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), column)


def test_other_databases_are_refused_with_a_clear_error() -> None:
    from alembic_counterfill.buffer import check_dialect
    from alembic_counterfill.errors import DatabaseError

    mock = sa.create_mock_engine("mssql://", lambda *a, **k: None)
    with pytest.raises(DatabaseError, match="not supported on mssql; declare them without"):
        check_dialect(mock, User.__table__)  # type: ignore[arg-type]


def test_autogenerate_creates_the_deltas_table(sqlite_url: str) -> None:
    from alembic.autogenerate import produce_migrations
    from alembic.operations import ops
    from alembic.runtime.migration import MigrationContext

    from alembic_counterfill import autogen

    engine = sa.create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            # Only the parent and children exist: the app turned a counter buffered.
            Base.metadata.create_all(
                conn, tables=[User.__table__, Follow.__table__, Post.__table__]
            )
            migration = produce_migrations(MigrationContext.configure(conn), Base.metadata)
        autogen.compare(None, migration.upgrade_ops, None)
        created = [o for o in migration.upgrade_ops.ops if isinstance(o, ops.CreateTableOp)]
        assert [o.table_name for o in created] == ["counterfill_deltas_users"]
        names = [c.name for c in created[0].columns if isinstance(c, sa.Column)]
        assert set(names) >= {"parent_id", "followers_count", "posts_count", "likes_total"}
    finally:
        engine.dispose()


def test_mariadb_writers_of_a_buffered_parent_share_its_lock(mariadb_url: str) -> None:
    """Two uncommitted writers of one buffered parent: neither waits for the other."""
    engine = sa.create_engine(mariadb_url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i) for i in (1, 2, 3)])
            s.commit()
        first, second = Session(engine), Session(engine)
        try:
            for s, follower in ((first, 2), (second, 3)):
                # Bounded: a writer waiting for the other fails here instead of hanging.
                s.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")
                s.add(Follow(follower_id=follower, followed_id=1))
                s.flush()  # would time out if the first writer held user 1 exclusively
            first.commit()
            second.commit()
        finally:
            first.close()
            second.close()
        assert drift(engine) == []
        assert_exact_then_fold(engine)
    finally:
        engine.dispose()


def test_deleting_a_parent_with_its_children_in_one_flush(db: sa.Engine) -> None:
    """The children's deltas for a parent the same flush deletes are dropped, not appended."""
    with Session(db) as s:
        s.add_all([Follow(id=i, follower_id=i, followed_id=2) for i in (1, 3)])
        s.add(Post(id=1, author_id=2, published=True, likes=3))
        s.commit()
        for obj in (s.get(Follow, 1), s.get(Follow, 3), s.get(Post, 1), s.get(User, 2)):
            s.delete(obj)
        s.commit()
    with db.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM users WHERE id = 2")) == 0
    assert_exact_then_fold(db)
