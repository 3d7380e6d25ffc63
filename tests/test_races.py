"""Deterministic races on PostgreSQL and MariaDB: each interleaving forced by a held lock.

A third connection (or the first racer's open transaction) holds a row lock;
the racers start and provably wait (pg_stat_activity; on MariaDB, SHOW ENGINE
INNODB STATUS, see races.innodb_waiters); then the lock is released. Each
test asserts no deadlock, no hang (racers are joined with a timeout) and exact
counters against the test's own COUNT/SUM (``drift``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import backfill_models as m
import pytest
import sqlalchemy as sa
from backfill_project import USER_COUNTERS, counters_by_key, drift, seed
from races import Racer, holding, race_engine, row_lock, wait_blocked, wait_until
from sqlalchemy.orm import Session

from alembic_counterfill import planning
from alembic_counterfill.batch import run_batch
from alembic_counterfill.verify import verify


@pytest.fixture
def eng(server_url: str) -> Iterator[sa.Engine]:
    engine = race_engine(server_url)
    yield engine
    engine.dispose()


def _users_and_posts(
    engine: sa.Engine, users: int = 3, posts: dict[int, int] | None = None
) -> None:
    """Tables, ``users`` users and posts through the ORM, so every counter starts exact."""
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=i, name=f"u{i}") for i in range(1, users + 1)])
        s.flush()
        for pid, author in (posts or {}).items():
            s.add(m.Post(id=pid, author_id=author, published=True, likes=5))
        s.commit()
    assert drift(engine) == []


def test_two_sessions_moving_one_post_to_different_authors(eng: sa.Engine) -> None:
    """The second mover holds a stale copy (author 1) and must wait for the first's commit."""
    _users_and_posts(eng, posts={1: 1})
    second = Session(eng, expire_on_commit=False)
    stale_post = second.get(m.Post, 1)
    second.commit()  # ends its snapshot; the copy keeps author_id = 1
    first = Session(eng)
    racer = None
    try:
        first.get(m.Post, 1).author_id = 2
        first.flush()  # holds the post row (and users 1, 2) until commit

        def move_to_3() -> None:
            stale_post.author_id = 3
            second.commit()

        racer = Racer(move_to_3, "second mover").start()
        wait_blocked(eng, 1, racer)
        first.commit()
        racer.join()
    finally:
        first.close()
        if racer is not None:
            racer.done.wait(60)
        second.close()
    assert drift(eng) == []
    with eng.connect() as conn:
        counts = dict(conn.execute(sa.text("SELECT id, posts_count FROM users ORDER BY id")).all())
    assert counts == {1: 0, 2: 0, 3: 1}


def test_live_write_inside_a_running_batch_range(eng: sa.Engine) -> None:
    """A batch holds users 1-9 and waits on user 10; a follow of user 5 waits on the batch."""
    seed(eng, users=100)
    counters = counters_by_key()
    with eng.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)

    def follow() -> None:
        with Session(eng) as s:
            s.add(m.Follow(follower_id=3, followed_id=5))
            s.commit()

    with holding(eng, f"SELECT id FROM users WHERE id = 10 {row_lock(eng)}"):
        batch = Racer(lambda: run_batch(eng, counters, plan.batch_ids[0]), "batch").start()
        wait_blocked(eng, 1, batch)
        writer = Racer(follow, "writer").start()
        wait_blocked(eng, 2, batch, writer)
    assert batch.join().applied
    writer.join()
    assert [d for d in drift(eng) if d[0] <= 50] == []  # the batch's range is exact


@pytest.fixture
def pg_eng(pg_url: str) -> Iterator[sa.Engine]:
    engine = race_engine(pg_url)
    yield engine
    engine.dispose()


#: Planner settings under which PostgreSQL's delta ``UPDATE … FROM unnest(…)``
#: hashes the parent ids and scans the parent table in heap order.
_HEAP_ORDER = ("enable_nestloop", "enable_mergejoin", "enable_indexscan", "enable_bitmapscan")


def test_a_flush_takes_its_parents_in_key_order_whatever_the_update_plan(
    pg_eng: sa.Engine,
) -> None:
    """A follow 3 -> 20 flushes while a batch holds users 1-9 and waits on 10 (PostgreSQL).

    User 3's row is rewritten first, so it lies after user 20's in the heap,
    and the writer's planner settings make its delta UPDATE visit parents in
    heap order (20, then 3). The writer must take user 3 before user 20 all
    the same (the parent pre-lock); had it locked 20 and then waited on 3,
    the batch, moving on from 10 to 20, would close a deadlock cycle.
    """
    eng = pg_eng
    seed(eng, users=100)
    counters = counters_by_key()
    with eng.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)
        conn.execute(sa.text("UPDATE users SET name = name WHERE id = 3"))  # to the heap's end

    def follow() -> None:
        with Session(eng) as s:
            for setting in _HEAP_ORDER:
                s.execute(sa.select(sa.func.set_config(setting, "off", True)))
            s.add(m.Follow(follower_id=3, followed_id=20))
            s.commit()

    with holding(eng, f"SELECT id FROM users WHERE id = 10 {row_lock(eng)}"):
        batch = Racer(lambda: run_batch(eng, counters, plan.batch_ids[0]), "batch").start()
        wait_blocked(eng, 1, batch)
        writer = Racer(follow, "writer").start()
        wait_blocked(eng, 2, batch, writer)
    assert batch.join().applied  # no deadlock: DeadlockDetected would be raised here
    writer.join()
    assert [d for d in drift(eng) if d[0] <= 50] == []  # exact, the follow included
    with eng.connect() as conn:
        followers = conn.execute(sa.text("SELECT followers_count FROM users WHERE id = 20"))
        truth = conn.execute(sa.text("SELECT count(*) FROM follows WHERE followed_id = 20"))
        assert followers.scalar_one() == truth.scalar_one() > 0


@pytest.fixture
def maria_eng(mariadb_url: str) -> Iterator[sa.Engine]:
    engine = race_engine(mariadb_url)
    yield engine
    engine.dispose()


def test_a_flush_takes_its_parents_in_key_order_whatever_the_insert_order(
    maria_eng: sa.Engine,
) -> None:
    """Posts by users 20 and 3, added in that order, flush while a batch holds users 1-9 (MariaDB).

    InnoDB's plans cannot be bent as PostgreSQL's are (every parent lock and
    delta UPDATE goes through the primary key, ``FORCE INDEX`` and
    ``STRAIGHT_JOIN``); the out-of-order locks InnoDB takes by itself are the
    INSERT's foreign-key checks, one shared parent lock per row in the order
    the rows are inserted: user 20, then user 3. The writer must take user 3
    before user 20 all the same (the parent pre-lock); had the INSERT taken
    20 and then waited on 3, the batch, moving on from 10 to 20, would close
    a deadlock cycle. (Two foreign keys of one row are checked in an order
    InnoDB does not promise: a ``Follow(20, 3)`` deadlocked in 1 run of 3
    without the pre-lock; two rows make it every run.)
    """
    eng = maria_eng
    seed(eng, users=100)
    counters = counters_by_key()
    with eng.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)

    def write() -> None:
        with Session(eng) as s:
            s.add(m.Post(author_id=20, published=True, likes=2))
            s.add(m.Post(author_id=3, published=True, likes=3))
            s.commit()

    with holding(eng, f"SELECT id FROM users WHERE id = 10 {row_lock(eng)}"):
        batch = Racer(lambda: run_batch(eng, counters, plan.batch_ids[0]), "batch").start()
        wait_blocked(eng, 1, batch)
        writer = Racer(write, "writer").start()
        wait_blocked(eng, 2, batch, writer)
    assert batch.join().applied  # no deadlock: error 1213 would be raised here
    writer.join()
    assert [d for d in drift(eng) if d[0] <= 50] == []  # exact, both posts included
    with eng.connect() as conn:
        cached = conn.execute(sa.text("SELECT posts_count FROM users WHERE id IN (3, 20)"))
        truth = conn.execute(
            sa.text("SELECT count(*) FROM posts WHERE published AND author_id IN (3, 20)")
        )
        assert sum(cached.scalars()) == truth.scalar_one() >= 2


@pytest.mark.parametrize("sync", ["auto", "evaluate", False])
def test_a_bulk_delete_of_most_of_a_small_table_waits_for_no_row_it_spares(
    maria_eng: sa.Engine, sync: object
) -> None:
    """Posts 2-12 by user 1 are bulk-deleted while another transaction deletes post 1 (MariaDB).

    The other transaction's uncommitted DELETE leaves 11 live rows in
    InnoDB's row estimate, as many as the bulk DELETE names: a single-table
    ``DELETE … WHERE id IN (…)`` is then a table scan from post 1, which
    waits for that transaction, where reaching the rows by key does not wait
    at all. Such a wait closed the deadlock cycle that
    ``tests/test_bulk_concurrency.py`` hit once in 20 runs (a key-ordered
    locking read held a lower, deleted row and waited for one of the
    DELETE's). The session holds the posts, so ``'auto'``/``'evaluate'``
    synchronize by fetching (a SELECT of the keys first), ``False`` not at
    all; either way the deleted posts leave the session as they would
    without counters.
    """
    eng = maria_eng
    _users_and_posts(eng, users=2, posts={1: 2, **{i: 1 for i in range(2, 13)}})

    def bulk_delete() -> tuple[int, int]:
        with Session(eng) as s:
            loaded = s.scalars(sa.select(m.Post).where(m.Post.id > 1)).all()
            result = s.execute(
                sa.delete(m.Post).where(m.Post.author_id == 1),
                execution_options={"synchronize_session": sync},
            )
            still = sum(p in s for p in loaded)
            s.commit()
            return int(result.rowcount), still

    # Behind the library's back, and rolled back: only its lock matters.
    with holding(eng, "DELETE FROM posts WHERE id = 1"):
        racer = Racer(bulk_delete, "bulk delete").start()
        wait_until(lambda: racer.done.is_set() or _blocked(eng), "the DELETE to end or wait")
        waited = not racer.done.is_set()
    deleted, still_in_session = racer.join()
    assert deleted == 11
    assert still_in_session == (11 if sync is False else 0)
    with eng.connect() as conn:
        left = conn.execute(sa.text("SELECT id FROM posts ORDER BY id")).scalars().all()
    assert left == [1]
    assert drift(eng) == []
    assert not waited, "the bulk DELETE waited for post 1, which it does not delete"


def test_a_bulk_update_of_most_of_a_small_table_waits_for_no_row_it_spares(
    maria_eng: sa.Engine,
) -> None:
    """Posts 2-12 move from user 1 to user 2 while another transaction deletes post 1 (MariaDB).

    The UPDATE names as many keys as InnoDB's row estimate, as the DELETE
    above; its ``FORCE INDEX (PRIMARY)`` keeps it on the key's ranges. The
    engine runs ``REPEATABLE READ`` (MariaDB's default), where an UPDATE
    has no semi-consistent read: a scan would wait for post 1.
    """
    eng = maria_eng
    _users_and_posts(eng, users=2, posts={1: 2, **{i: 1 for i in range(2, 13)}})

    def bulk_update() -> int:
        with Session(eng) as s:
            result = s.execute(sa.update(m.Post).where(m.Post.author_id == 1).values(author_id=2))
            s.commit()
            return int(result.rowcount)

    with holding(eng, "DELETE FROM posts WHERE id = 1"):
        racer = Racer(bulk_update, "bulk update").start()
        wait_until(lambda: racer.done.is_set() or _blocked(eng), "the UPDATE to end or wait")
        waited = not racer.done.is_set()
    assert racer.join() == 11
    assert drift(eng) == []
    with eng.connect() as conn:
        moved = conn.execute(sa.text("SELECT count(*) FROM posts WHERE author_id = 2"))
        assert moved.scalar_one() == 12
    assert not waited, "the bulk UPDATE waited for post 1, which it does not update"


def test_bulk_delete_racing_an_orm_insert_into_its_where(eng: sa.Engine) -> None:
    """An insert of a post by author 1 commits (or queues) just before DELETE ... author 1 runs."""
    _users_and_posts(eng, posts={1: 1, 2: 1, 3: 2})
    inserted: list[Racer] = []

    def insert_post() -> None:
        with Session(eng) as s:
            s.add(m.Post(id=4, author_id=1, published=True, likes=7))
            s.commit()

    def before_delete(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if inserted or not statement.lstrip().upper().startswith("DELETE FROM POSTS"):
            return
        racer = Racer(insert_post, "inserter").start()
        inserted.append(racer)
        # Either the insert commits first, or it queues behind locks the bulk delete holds.
        wait_until(lambda: racer.done.is_set() or _blocked(eng), "the insert to land or queue")

    sa.event.listen(eng, "before_cursor_execute", before_delete)
    try:
        with Session(eng) as s:
            s.execute(sa.delete(m.Post).where(m.Post.author_id == 1))
            s.commit()
    finally:
        sa.event.remove(eng, "before_cursor_execute", before_delete)
        for racer in inserted:
            racer.done.wait(60)
    assert inserted, "the bulk delete never ran a DELETE on posts"
    inserted[0].join()
    assert drift(eng) == []


def _blocked(engine: sa.Engine) -> bool:
    from races import lock_waiters

    return lock_waiters(engine) > 0


def test_verify_fix_racing_a_writer(eng: sa.Engine) -> None:
    """verify --fix re-checks user 7 under lock: it waits for the writer, then fixes exactly."""
    _users_and_posts(eng, users=10)
    with eng.begin() as conn:  # drift on purpose, behind the library's back
        conn.execute(sa.text("UPDATE users SET followers_count = 9 WHERE id = 7"))
    writer = Session(eng)
    racer = None
    try:
        writer.add(m.Follow(follower_id=1, followed_id=7))
        writer.flush()  # its delta holds user 7's row until commit
        counters = list(counters_by_key().values())
        racer = Racer(lambda: verify(eng, counters, fix=True), "verify --fix").start()
        wait_blocked(eng, 1, racer)
        writer.commit()
        findings = racer.join()
    finally:
        writer.close()
        if racer is not None:
            racer.done.wait(60)
    assert drift(eng) == []
    fixed = [(f.id, f.column, f.actual, f.fixed) for f in findings]
    assert fixed == [(7, "followers_count", 1, True)]
