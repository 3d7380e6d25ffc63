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


@pytest.fixture
def links_db(mariadb_url: str) -> Iterator[sa.Engine]:
    """MariaDB at READ COMMITTED with the association-table models of ``assoc_models``."""
    import assoc_models as am

    engine = sa.create_engine(mariadb_url, isolation_level="READ COMMITTED")
    try:
        am.Base.metadata.create_all(engine)
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
    links_db: sa.Engine,
) -> None:
    # A link INSERT's foreign-key checks take shared locks on both people; the
    # flush must hold them exclusively first (key order), or two writers of the
    # same people's links deadlock. Likewise before a link DELETE.
    import assoc_models as am

    engine = links_db
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(" ".join(statement.upper().split()))

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
        # A links-only flush locks with its predicted delta UPDATE (link_locks).
        lock = next(
            i
            for i, st in enumerate(statements)
            if st.startswith("UPDATE JSON_TABLE") and "STRAIGHT_JOIN USERS" in st
        )
        write = next(
            i
            for i, st in enumerate(statements)
            if st.startswith(("INSERT INTO FOLLOWERS", "DELETE FROM FOLLOWERS"))
        )
        assert lock < write, statements
        am.assert_exact(engine)


def _flush_statements(engine: sa.Engine, session: Session) -> list[str]:
    statements: list[str] = []
    mine = session.connection()  # not a probe's connection

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if conn is mine:
            statements.append(" ".join(statement.upper().split()))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        session.flush()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return statements


def test_a_links_only_flush_locks_and_adds_in_one_statement_before_its_link_insert(
    links_db: sa.Engine,
) -> None:
    # Issue 15: appending links costs ONE statement more than without counters.
    # The parent lock before the link INSERT is the delta UPDATE itself, with
    # the deltas the collections predict (both sides of a back_populates pair
    # loaded: each link predicted once); nothing is left to apply after it.
    # The parents stay locked (exclusively, by this transaction) until it ends.
    import assoc_models as am

    engine = links_db
    with Session(engine) as s:
        s.add_all([am.Post(id=i) for i in range(1, 4)] + [am.Tag(id=i) for i in range(1, 4)])
        s.commit()
    with Session(engine) as s:
        posts = {p.id: p for p in s.scalars(sa.select(am.Post))}
        tags = {t.id: t for t in s.scalars(sa.select(am.Tag))}
        for p in posts.values():
            assert p.tags == set()
        for t in tags.values():
            assert t.posts == []
        posts[1].tags.add(tags[2])
        posts[3].tags.add(tags[2])
        tags[3].posts.append(posts[3])
        statements = _flush_statements(engine, s)
        assert [st.split(" ")[0] for st in statements] == ["UPDATE", "UPDATE", "INSERT"], statements
        assert "STRAIGHT_JOIN POSTS" in statements[0], statements
        assert "STRAIGHT_JOIN TAGS" in statements[1], statements
        assert statements[2].startswith("INSERT INTO POST_TAGS"), statements
        # Read after the flush, before the commit: the loaded parents were expired.
        assert [posts[i].tags_count for i in (1, 2, 3)] == [1, 0, 2]
        assert [tags[i].posts_count for i in (1, 2, 3)] == [0, 2, 1]
        assert _locked_by_someone(engine, "posts", 3)
        assert _locked_by_someone(engine, "tags", 2)
        assert not _locked_by_someone(engine, "posts", 2)
        s.commit()
    am.assert_exact(engine)


def test_a_links_flush_applies_what_its_prediction_missed_after_the_writes(
    links_db: sa.Engine,
) -> None:
    # The prediction covers plain counts of persistent objects only: a new
    # target's link, the where= and sum= counters of the same rows, and a
    # link removed and the counters it decrements are applied exactly
    # after the link statements, still within the flush.
    import assoc_models as am

    engine = links_db
    with Session(engine) as s:
        users = [am.User(id=i, name=f"u{i}") for i in range(1, 5)]
        s.add_all(users)
        users[0].following.extend(users[1:3])
        s.commit()
    with Session(engine) as s:
        # Everything loaded first: a load would autoflush the changes made before it.
        one, two, three, four = (s.get(am.User, i) for i in range(1, 5))
        assert one is not None and two is not None
        assert three is not None and four is not None
        assert len(one.following) == 2 and four.followers == []
        one.following.remove(two)
        one.following.append(four)
        one.following.append(am.User(id=9, name="new"))
        four.followers.append(three)
        statements = _flush_statements(engine, s)
        writes = [
            i
            for i, st in enumerate(statements)
            if st.startswith(("INSERT INTO FOLLOWERS", "DELETE FROM FOLLOWERS"))
        ]
        assert statements[0].startswith("UPDATE JSON_TABLE"), statements
        assert len(writes) == 2 and writes[0] > 0, statements
        s.commit()
    am.assert_exact(engine)


def test_a_links_flush_whose_before_flush_hook_fails_leaves_the_counters_alone(
    links_db: sa.Engine,
) -> None:
    # A before_flush hook registered after ours raises: the flush stops before
    # its transaction, which is NOT rolled back and may be committed. The
    # predicted deltas must not have reached the parents (they run only at the
    # flush's first statement); the flush that follows counts the links once.
    import assoc_models as am

    engine = links_db

    def refuse(session: Session, *args: object) -> None:
        raise RuntimeError("refused by a later hook")

    with Session(engine) as s:
        s.add_all([am.Post(id=1), am.Tag(id=1), am.Tag(id=2)])
        s.commit()
    with Session(engine) as s:
        post, one, two = s.get(am.Post, 1), s.get(am.Tag, 1), s.get(am.Tag, 2)
        assert post is not None and post.tags == set()
        post.tags.add(one)
        sa.event.listen(s, "before_flush", refuse)
        with pytest.raises(RuntimeError, match="refused"):
            s.flush()
        sa.event.remove(s, "before_flush", refuse)
        with s.no_autoflush:  # a statement between the two flushes
            assert s.execute(sa.select(am.Post.tags_count)).scalar_one() == 0
        post.tags.add(two)
        s.commit()
    am.assert_exact(engine)
    assert am.links(engine) == 2


def test_a_links_flush_locks_a_parent_whose_predicted_delta_is_zero(links_db: sa.Engine) -> None:
    # A post losing one tag and gaining another (a tag likewise): its delta is 0, yet its link
    # DELETE and INSERT need it locked first. The one UPDATE lists it with a
    # zero delta, which InnoDB locks all the same (the row is reached through
    # the primary key), before the locking read of the link rows to delete.
    import assoc_models as am

    engine = links_db
    with Session(engine) as s:
        post, one, two = am.Post(id=1), am.Tag(id=1), am.Tag(id=2)
        post.tags.add(one)
        s.add_all([post, am.Post(id=2), one, two])
        s.commit()
    with Session(engine) as s:
        post, other = s.get(am.Post, 1), s.get(am.Post, 2)
        one, two = s.get(am.Tag, 1), s.get(am.Tag, 2)
        assert post is not None and other is not None
        assert one is not None and two is not None
        assert post.tags == {one} and other.tags == set()
        assert len(one.posts) == 1 and two.posts == []
        post.tags.remove(one)
        post.tags.add(two)
        other.tags.add(one)  # post 2 +1, tag 1 -1 +1 = 0, tag 2 +1
        locked_after: dict[str, bool] = {}

        def probe(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            # Right after each parent UPDATE, before any link statement has
            # run (whose foreign-key checks would lock the parents too).
            for table in ("posts", "tags"):
                if statement.startswith("UPDATE") and f"STRAIGHT_JOIN {table} " in statement:
                    locked_after[table] = _locked_by_someone(engine, table, 1)

        sa.event.listen(engine, "after_cursor_execute", probe)
        try:
            statements = _flush_statements(engine, s)
        finally:
            sa.event.remove(engine, "after_cursor_execute", probe)
        assert locked_after == {"posts": True, "tags": True}
        kinds = [st.split(" ")[0] for st in statements]
        assert kinds[:2] == ["UPDATE", "UPDATE"], statements
        assert "STRAIGHT_JOIN POSTS" in statements[0], statements
        assert "UPDATE" not in kinds[2:], statements  # the prediction was exact
        assert any(st.startswith("DELETE FROM POST_TAGS") for st in statements)
        assert (post.tags_count, other.tags_count) == (1, 1)
        assert (one.posts_count, two.posts_count) == (1, 1)
        s.commit()
    am.assert_exact(engine)
