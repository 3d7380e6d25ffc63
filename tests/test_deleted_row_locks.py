"""Natural keys on InnoDB: a flush locks the parents a key names before the rows under it.

MariaDB at READ COMMITTED, ``Follow(follower_id, followed_id)`` (its key
names both users it counts toward). Three interleavings of
tests/test_live_concurrency.py deadlocked (InnoDB error 1213) while a flush
locked the rows it deletes first and their parents second, each forced here
with held locks and gates on one flush's statements:

- A stale delete's locking read waits for a transaction deleting the row
  and is granted, once that one commits, a lock on the delete-marked record,
  which InnoDB keeps until purge; it then waits for users 1 and 2, held by
  an inserter of the same key whose INSERT (duplicate-key check) waits for
  that lock (6 of 40 runs of the concurrency test before the fix).
- A stale delete finds its row gone, locks its copy's parents and reads the
  key again; the key was re-inserted meanwhile and locked by a fresh deleter
  that waits for those parents.
- An inserter with an explicit surrogate key (``Post(id=7)``) whose probe saw
  a row that was deleted before its locking read and re-inserted (naming the
  same author) before its parent lock, then locked by a fresh deleter: the
  inserter took the key as locked, skipped the probe after the parent lock,
  and its INSERT waited for the deleter. Now only the rows found under the
  lock count as locked, and it fails at once with ``DuplicateKeyError``.

Judged by the outcome of each racer and an independent COUNT (``assert_exact``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from races import JOIN_TIMEOUT, Racer, lock_waiters, race_engine, settle, wait_blocked, wait_until
from social import Base, Follow, Post, User, assert_exact
from sqlalchemy.orm import Session

from alembic_counterfill.errors import DuplicateKeyError

pytestmark = [
    pytest.mark.timeout(120),
    # Racers' DELETEs of a row already gone (expected here) warn; catch_warnings
    # in their threads races with the other threads', so filter for the module.
    pytest.mark.filterwarnings(
        "ignore:DELETE statement on table 'follows' expected to delete:sqlalchemy.exc.SAWarning"
    ),
]


@pytest.fixture
def eng(mariadb_url: str) -> Iterator[sa.Engine]:
    engine = race_engine(mariadb_url, isolation_level="READ COMMITTED")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i) for i in (1, 2, 3, 4)])
        s.flush()
        s.add(Follow(follower_id=1, followed_id=2))
        s.commit()
    yield engine
    engine.dispose()


def _is_parent_lock(statement: str) -> bool:
    """The flush's exclusive lock of its integer-keyed parents (innodb._lock_from_json)."""
    text = " ".join(statement.split()).upper()
    return text.startswith("SELECT USERS.ID FROM JSON_TABLE") and text.endswith("FOR UPDATE")


class Gates:
    """Hold one connection before statements matching each predicate, in turn, until opened."""

    def __init__(self, engine: sa.Engine, conn: Any, *predicates: Any) -> None:
        self.engine, self.conn, self.predicates = engine, conn, list(predicates)
        self.reached = [threading.Event() for _ in predicates]
        self.opened = [threading.Event() for _ in predicates]
        self.next = 0

    def hold(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        i = self.next
        if conn is self.conn and i < len(self.predicates) and self.predicates[i](statement):
            self.next += 1
            self.reached[i].set()
            self.opened[i].wait(JOIN_TIMEOUT)

    def __enter__(self) -> Gates:
        sa.event.listen(self.engine, "before_cursor_execute", self.hold)
        return self

    def __exit__(self, *exc: Any) -> None:
        for event in self.opened:
            event.set()
        sa.event.remove(self.engine, "before_cursor_execute", self.hold)

    def reach(self, i: int, what: str) -> None:
        wait_until(self.reached[i].is_set, what)

    def open(self, i: int) -> None:
        self.opened[i].set()


def _upper(statement: str) -> str:
    return " ".join(statement.split()).upper()


def _follows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM follows")).scalar_one())


def _delete_follow() -> Any:
    def run(engine: sa.Engine) -> None:
        with Session(engine) as s, warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched: deleted first
            s.delete(s.get(Follow, (1, 2)))
            s.commit()

    return run


def _insert_follow(engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Follow(follower_id=1, followed_id=2))
        s.commit()


def test_a_stale_delete_and_an_inserter_of_its_key_queue_on_the_parents(
    eng: sa.Engine,
) -> None:
    """D deletes Follow(1, 2); W (stale copy) deletes it too; D commits; I inserts it."""
    stale = Session(eng, expire_on_commit=False)
    copy = stale.get(Follow, (1, 2))
    assert copy is not None
    stale.commit()
    # An open REPEATABLE READ snapshot keeps InnoDB from purging the deleted
    # record, as a busy server often does for a while.
    purge_guard = eng.connect().execution_options(isolation_level="REPEATABLE READ")
    purge_guard.execute(sa.text("SELECT count(*) FROM follows")).scalar_one()
    deleter = Session(eng)

    def stale_delete() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched: the row is gone
            stale.delete(copy)
            stale.commit()

    seen: list[str] = []

    def after_its_row_lock(statement: str) -> bool:
        """The statement after the stale flush's locking read of the follows row."""
        if seen:
            return True
        text = _upper(statement)
        if "FROM FOLLOWS" in text and text.endswith("FOR UPDATE"):
            seen.append(text)
        return False

    racers: list[Racer] = []
    try:
        with Gates(eng, stale.connection(), after_its_row_lock) as gates:
            deleter.delete(deleter.get(Follow, (1, 2)))
            deleter.flush()  # holds the follows row and users 1, 2 until it commits
            racers.append(Racer(stale_delete, "stale deleter").start())
            wait_blocked(eng, 1, *racers)  # W waits for D (before: for the row; now: user 1)
            deleter.commit()
            gates.reach(0, "the stale flush to have read its (deleted) row")
            racers.append(Racer(lambda: _insert_follow(eng), "inserter").start())
            # Before the fix W held the deleted record's lock and no parent:
            # I took users 1 and 2 and its INSERT waited for W, which then
            # waited for I. Now W holds the users and I waits for them.
            wait_until(
                lambda: racers[1].done.is_set() or lock_waiters(eng) >= 1,
                "the inserter to finish or to wait for a lock",
            )
            gates.open(0)
            for racer in racers:
                racer.join()
    finally:
        settle(racers)
        deleter.close()
        stale.close()
        purge_guard.rollback()
        purge_guard.close()
    assert_exact(eng)
    assert _follows(eng) == 1  # serial order: D, W (matching nothing), I


def test_a_key_found_gone_is_reread_under_parents_held_by_a_writer_that_waits_for_them(
    eng: sa.Engine,
) -> None:
    """W's old row is gone; R re-inserts it; T locks it to delete it and waits for W's parents.

    Before the fix, W's locking re-read of the key under its parent locks
    waited for T: a deadlock. Now W locks users 1 and 2 before reading the
    key at all, and T, locking the same parents first, waits for W's commit.
    The gates hold W before its parent lock (R re-inserts the key) and before
    its first read of the follows table after it (T starts).
    """
    stale = Session(eng, expire_on_commit=False)
    copy = stale.get(Follow, (1, 2))
    assert copy is not None
    stale.commit()
    _delete_follow()(eng)  # the row W's copy names is gone
    w_conn = stale.connection()

    def stale_delete() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched
            stale.delete(copy)
            stale.commit()

    def after_parents(statement: str) -> bool:
        return _upper(statement).startswith("SELECT FOLLOWS.")

    racers: list[Racer] = []
    try:
        with Gates(eng, w_conn, _is_parent_lock, after_parents) as gates:
            racers.append(Racer(stale_delete, "stale deleter").start())
            gates.reach(0, "the stale flush to reach its parent lock")
            _insert_follow(eng)  # R: the key is back, committed
            gates.open(0)
            gates.reach(1, "the stale flush to re-read the key under its parent locks")
            racers.append(Racer(lambda: _delete_follow()(eng), "fresh deleter").start())
            wait_blocked(eng, 1, racers[1])  # T holds the row and waits for users 1, 2
            gates.open(1)
            for racer in racers:
                racer.join()
    finally:
        settle(racers)
        stale.close()
    assert_exact(eng)
    assert _follows(eng) == 0  # T deleted R's row; W's DELETE matched nothing


def test_a_colliding_row_deleted_and_reinserted_before_the_parent_lock_is_a_duplicate(
    eng: sa.Engine,
) -> None:
    """I's probe sees Post 7; D deletes it before I locks it; R re-inserts it (author 1)
    before I's parent lock; T locks it to delete it and waits for I's user 1."""
    with Session(eng) as s:
        s.add(Post(id=7, author_id=1, likes=2))
        s.commit()
    inserter = Session(eng)
    i_conn = inserter.connection()

    def locks_posts(statement: str) -> bool:
        text = _upper(statement)
        return "FROM POSTS" in text and text.endswith("FOR UPDATE")

    def anything(statement: str) -> bool:
        return True

    def insert() -> None:
        inserter.add(Post(id=7, author_id=1, likes=5))
        try:
            inserter.commit()
        except sa.exc.IntegrityError:
            inserter.rollback()  # gives the parents back to T at once
            raise

    def delete_post() -> None:
        with Session(eng) as s:
            s.delete(s.get(Post, 7))
            s.commit()

    def reinsert_post() -> None:
        with Session(eng) as s:
            s.add(Post(id=7, author_id=1, likes=3))
            s.commit()

    racers: list[Racer] = []
    try:
        with Gates(eng, i_conn, locks_posts, _is_parent_lock, anything) as gates:
            racers.append(Racer(insert, "inserter").start())
            gates.reach(0, "the inserter to lock the row its probe saw")
            delete_post()  # D
            gates.open(0)
            gates.reach(1, "the inserter to reach its parent lock")
            reinsert_post()  # R
            gates.open(1)
            gates.reach(2, "the inserter to hold its parents")
            racers.append(Racer(delete_post, "fresh deleter").start())
            wait_blocked(eng, 1, racers[1])  # T holds the row and waits for user 1
            gates.open(2)
            with pytest.raises(sa.exc.IntegrityError) as failed:
                racers[0].join()
            racers[1].join()
    finally:
        settle(racers)
        inserter.close()
    assert isinstance(failed.value.orig, DuplicateKeyError)
    assert_exact(eng)
    with eng.connect() as conn:  # T deleted R's post; I inserted nothing
        assert conn.execute(sa.text("SELECT count(*) FROM posts")).scalar_one() == 0


def test_a_bulk_delete_of_natural_keys_locks_their_parents_before_the_rows(
    eng: sa.Engine,
) -> None:
    """F deletes Follow(1, 2) by the ORM and holds users 1, 2; B bulk-deletes user 1's follows.

    F locks the parents its key names before the row. A bulk DELETE that
    locked its rows first (follows (1, 2) and (1, 3)) and their parents
    second held the row F then waited for, while it waited for F's users: a
    deadlock. Now B locks users 1, 2, 3 first, waits for F with no row held,
    and deletes what is left after F commits.
    """
    with Session(eng) as s:
        s.add(Follow(follower_id=1, followed_id=3))
        s.commit()
    flusher = Session(eng)
    f_conn = flusher.connection()

    def anything(statement: str) -> bool:
        return True

    def orm_delete() -> None:
        flusher.delete(flusher.get(Follow, (1, 2)))
        flusher.commit()

    def bulk_delete() -> int:
        with Session(eng) as s:
            deleted = s.execute(sa.delete(Follow).where(Follow.follower_id == 1)).rowcount
            s.commit()
            return int(deleted)

    racers: list[Racer] = []
    try:
        with Gates(eng, f_conn, _is_parent_lock, anything) as gates:
            racers.append(Racer(orm_delete, "ORM delete").start())
            gates.reach(0, "the flush to reach its parent lock")
            gates.open(0)
            gates.reach(1, "the flush to hold users 1 and 2")
            racers.append(Racer(bulk_delete, "bulk delete").start())
            wait_blocked(eng, 1, racers[1])  # B waits for user 1 (before: holding both rows)
            gates.open(1)
            racers[0].join()
            assert racers[1].join() == 1  # (1, 3): F deleted (1, 2) first
    finally:
        settle(racers)
        flusher.close()
    assert_exact(eng)
    assert _follows(eng) == 0
