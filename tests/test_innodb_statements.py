"""MariaDB statement shapes: what the live-delta and batch-recount forms lock; exact results."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User, assert_exact
from sqlalchemy.orm import Session

from alembic_counterfill import innodb, innodb_recount
from alembic_counterfill.counters import counters_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(mariadb_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(mariadb_url, isolation_level="READ COMMITTED")
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:  # a small parent table: where InnoDB likes to scan
            s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
            s.commit()
        yield engine
    finally:
        engine.dispose()


def _locked_by_someone(engine: sa.Engine, table: str, key: int) -> bool:
    """Whether another session holds row ``key`` of ``table`` (a 1 s lock wait says so)."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        try:
            conn.execute(
                sa.text(f"SELECT id FROM {table} WHERE id = :k FOR UPDATE"),  # noqa: S608 - constants
                {"k": key},
            ).all()
        except sa.exc.OperationalError as exc:
            assert "1205" in str(exc), exc  # lock wait timeout, nothing else
            return True
        finally:
            conn.rollback()
    return False


def test_a_flush_delta_update_reaches_only_its_parents(db: sa.Engine) -> None:
    # Another session holds parents 1, 3 and 5. A flush adding children of 2 and 4
    # must never wait for them: a scan of the (small) parent table would, and
    # between writers that is a deadlock. Its lock waits end after 2 s here.
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement.upper())

    with db.connect() as other:
        for key in (1, 3, 5):  # one by one: an IN list may scan and lock more
            other.execute(sa.text("SELECT id FROM users WHERE id = :k FOR UPDATE"), {"k": key})
        session = Session(db)
        try:
            session.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")
            sa.event.listen(db, "before_cursor_execute", record)
            try:
                session.add_all([Post(author_id=2, likes=3), Post(author_id=4, likes=1)])
                session.add(Follow(follower_id=2, followed_id=4))
                session.flush()
            finally:
                sa.event.remove(db, "before_cursor_execute", record)
            session.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
            session.commit()
        finally:
            session.close()
            other.rollback()
    # One parent lock before the writes, one delta UPDATE after: both join the JSON keys first.
    ours = [s for s in statements if "JSON_TABLE" in s]
    assert [s.lstrip().split()[0] for s in ours] == ["SELECT", "UPDATE"], statements
    assert all("STRAIGHT_JOIN USERS FORCE INDEX (PRIMARY)" in s for s in ours), ours
    assert_exact(db)


def test_a_parent_found_during_the_flush_is_locked_by_the_delta_update_itself(
    db: sa.Engine,
) -> None:
    # Another session holds parents 1, 3 and 5. A flush adds a post of user 2 and
    # one of a new user, whose key only its own INSERT gives: the pre-lock cannot
    # name it. The delta UPDATE reaches its parents through key-ordered JSON rows
    # and the primary key, so it locks the new user itself, in key order, with no
    # locking read of its own, and never waits for 1, 3 or 5 (2 s lock waits here).
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement.upper())

    with db.connect() as other:
        for key in (1, 3, 5):
            other.execute(sa.text("SELECT id FROM users WHERE id = :k FOR UPDATE"), {"k": key})
        session = Session(db)
        try:
            session.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")
            sa.event.listen(db, "before_cursor_execute", record)
            try:
                session.add(Post(author_id=2, likes=3))
                session.add(Post(author=User(name="new"), likes=4))
                session.flush()
            finally:
                sa.event.remove(db, "before_cursor_execute", record)
            session.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
            session.commit()
        finally:
            session.close()
            other.rollback()
    ours = [s for s in statements if "JSON_TABLE" in s]
    assert [s.lstrip().split()[0] for s in ours] == ["SELECT", "UPDATE"], statements
    assert all("STRAIGHT_JOIN USERS FORCE INDEX (PRIMARY)" in s for s in ours), ours
    assert_exact(db)
    with db.connect() as conn:  # the new user's own counters, against the test's COUNT/SUM
        new_id = conn.execute(sa.text("SELECT id FROM users WHERE name = 'new'")).scalar_one()
        got = conn.execute(
            sa.text("SELECT likes_total, posts_count FROM users WHERE id = :k"), {"k": new_id}
        ).one()
        want = conn.execute(
            sa.text("SELECT SUM(likes), COUNT(*) FROM posts WHERE author_id = :k"), {"k": new_id}
        ).one()
        assert tuple(got) == (4, 1) == tuple(want)


def test_a_non_integer_delta_takes_the_case_form(db: sa.Engine) -> None:
    # The JSON form carries integers only; a float (or Decimal) delta takes the CASE form.
    likes = next(c.column for c in counters_of(User) if c.column.name == "likes_total")
    table, pk = User.__table__, User.__table__.c.id
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement.upper())

    with db.connect() as conn:
        sa.event.listen(db, "before_cursor_execute", record)
        try:
            innodb.apply_deltas(conn, table, pk, {3: {likes: 2.0}})  # type: ignore[dict-item]
            innodb.apply_deltas(conn, table, pk, {3: {likes: 5}, 4: {likes: 0}})
        finally:
            sa.event.remove(db, "before_cursor_execute", record)
        got = dict(conn.execute(sa.select(pk, likes).order_by(pk)).all())
        conn.rollback()
    updates = [s for s in statements if s.lstrip().startswith("UPDATE")]
    assert len(updates) == 2 and "CASE" in updates[0] and "JSON_TABLE" in updates[1], updates
    assert got == {1: 0, 2: 0, 3: 7, 4: 0, 5: 0}


@pytest.mark.parametrize("table", ["posts", "follows"])
def test_a_bulk_delete_of_every_row_of_a_small_table_reaches_each_row_by_key(
    db: sa.Engine, table: str
) -> None:
    # A single-table DELETE naming every row of a 4-row table is a table scan
    # (EXPLAIN: ALL), which waits for rows other writers hold, spared or not.
    # The server's own plan of the statement the library sends, explained on
    # its connection just before it runs, must reach each row by key (eq_ref).
    with Session(db) as s:
        s.add_all([Post(id=i, author_id=1 + i % 2, likes=i) for i in range(1, 5)])
        s.add_all([Follow(follower_id=1, followed_id=f) for f in (2, 3, 4, 5)])
        s.commit()
    plans: list[list[tuple[object, ...]]] = []

    def explain(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith(f"DELETE FROM {table.upper()}"):
            probe = cursor.connection.cursor()
            probe.execute("EXPLAIN " + statement, parameters)
            plans.append(list(probe.fetchall()))
            probe.close()

    stmt = (
        sa.delete(Post).where(Post.likes > 0)
        if table == "posts"
        else sa.delete(Follow).where(Follow.follower_id == 1)
    )
    sa.event.listen(db, "before_cursor_execute", explain)
    try:
        with Session(db) as s:
            deleted = s.execute(stmt).rowcount
            s.commit()
    finally:
        sa.event.remove(db, "before_cursor_execute", explain)
    assert len(plans) == 1, plans
    access = {row[2]: row[3] for row in plans[0]}  # EXPLAIN's table -> access type
    assert access[table] == "eq_ref", plans[0]
    with db.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 0  # noqa: S608 - constant
    assert deleted == 4
    assert_exact(db)


@pytest.mark.parametrize("stage", ["MEMORY", "InnoDB"])
def test_a_batch_recount_locks_no_child_row_and_is_exact(
    db: sa.Engine, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if stage == "InnoDB":  # what a batch too large for the in-memory stage uses
        monkeypatch.setattr(innodb_recount, "MEMORY_ROWS", 0)
    with Session(db) as s:
        s.add_all([Post(author_id=1 + i % 5, likes=i, published=i % 3 > 0) for i in range(40)])
        s.add_all([Follow(follower_id=a, followed_id=b) for a in range(1, 6) for b in (1, 2)])
        s.commit()
    with db.begin() as conn:  # every counter wrong: the recount must rewrite them all
        conn.execute(
            sa.update(User.__table__).values(
                followers_count=9, following_count=9, posts_count=9, likes_total=9
            )
        )
    counters = counters_of(User)  # four counters over posts and follows, one over users
    post_id = 7
    with db.connect() as conn:
        conn.execution_options(isolation_level=innodb.ISOLATION)
        parents = innodb.lock_parents(conn, User.__table__, User.__table__.c.id, 2, 5)
        assert parents == 3
        changed = innodb_recount.recount_range(conn, counters, 2, 5, parents=parents)
        (name,) = conn.info[innodb_recount._STAGES]
        created = conn.execute(sa.text(f"SHOW CREATE TABLE {name}")).one()[1]
        assert f"ENGINE={stage}" in created, created
        # Still inside the batch's transaction: no child row is locked, parents 2-4 are.
        assert not _locked_by_someone(db, "posts", post_id)
        assert [_locked_by_someone(db, "users", k) for k in range(1, 6)] == [
            False,
            True,
            True,
            True,
            False,
        ]
        conn.commit()
        assert changed == 3
        # The stage is emptied and reused by the next recount on this connection.
        changed = innodb_recount.recount_range(conn, counters, None, None, parents=5)
        conn.commit()
    assert changed == 2  # parents 1 and 5, left wrong outside the first range
    assert_exact(db)


def test_a_batch_transaction_reads_committed_rows_and_the_next_one_does_not(
    mariadb_url: str,
) -> None:
    # The engine's default is InnoDB's REPEATABLE READ; a batch sets READ COMMITTED
    # for its own transaction only, so its recount after a lock wait sees what
    # the writers it waited for committed, and the pooled connection keeps its level.
    engine = sa.create_engine(mariadb_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1, 0)")

        def sees_a_commit_made_after_its_first_read(conn: sa.Connection, value: int) -> bool:
            conn.exec_driver_sql("SELECT v FROM t WHERE id = 1").scalar_one()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
                other.exec_driver_sql(f"UPDATE t SET v = {value:d} WHERE id = 1")
            seen = conn.exec_driver_sql("SELECT v FROM t WHERE id = 1").scalar_one()
            conn.rollback()
            return bool(seen == value)

        with engine.connect() as conn:
            innodb.read_committed_transaction(conn)
            assert sees_a_commit_made_after_its_first_read(conn, 1)
            assert not sees_a_commit_made_after_its_first_read(conn, 2)
    finally:
        engine.dispose()


def test_a_collection_flush_locks_the_link_parents_before_its_link_writes(
    mariadb_url: str,
) -> None:
    # A link INSERT's foreign-key checks take shared locks on both people; the
    # flush must hold them exclusively first (key order), or two writers of the
    # same people's links deadlock. Likewise before a link DELETE.
    import assoc_models as am

    engine = sa.create_engine(mariadb_url, isolation_level="READ COMMITTED")
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(" ".join(statement.upper().split()))

    try:
        am.Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([am.User(id=i, name=f"u{i}") for i in range(1, 5)])
            s.commit()
        for change in ("append", "remove"):
            with Session(engine) as s:
                a, b = s.get(am.User, 3), s.get(am.User, 1)
                assert a is not None and b is not None
                getattr(a.following, change)(b)
                statements.clear()
                sa.event.listen(engine, "before_cursor_execute", record)
                try:
                    s.flush()
                finally:
                    sa.event.remove(engine, "before_cursor_execute", record)
                s.commit()
            lock = next(
                i
                for i, st in enumerate(statements)
                if st.startswith("SELECT USERS.ID FROM JSON_TABLE") and st.endswith("FOR UPDATE")
            )
            write = next(
                i
                for i, st in enumerate(statements)
                if st.startswith(("INSERT INTO FOLLOWERS", "DELETE FROM FOLLOWERS"))
            )
            assert lock < write, statements
            am.assert_exact(engine)
    finally:
        engine.dispose()
