"""A flush never waits for its parents holding a lock on a deleted (not yet purged) row.

MariaDB at READ COMMITTED. A locking read that waits for a transaction
deleting the row is granted, once that one commits, a lock on the
delete-marked record, and InnoDB keeps it until the record is purged. The
flush of a stale copy of ``Follow(1, 2)`` reads its old row that way (the
row is gone), then locks the parents its copy names, users 1 and 2. An
inserter of ``Follow(1, 2)`` that took those parents first then waits, in
its INSERT's duplicate-key check, for that record lock: before the fix, the
two deadlocked (InnoDB error 1213; tests/test_live_concurrency.py hit it
about 1 run in 8). The interleaving is forced: the stale flush is held just
before its parent lock until the inserter finished or waits for a lock.
Judged by the absence of any error and by an independent COUNT
(``assert_exact``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from races import JOIN_TIMEOUT, Racer, lock_waiters, race_engine, wait_blocked, wait_until
from social import Base, Follow, User, assert_exact
from sqlalchemy.orm import Session

pytestmark = pytest.mark.timeout(120)


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


def test_a_stale_delete_waiting_for_parents_holds_no_lock_on_the_deleted_row(
    eng: sa.Engine,
) -> None:
    stale = Session(eng, expire_on_commit=False)
    copy = stale.get(Follow, (1, 2))
    assert copy is not None
    stale.commit()
    # An open REPEATABLE READ snapshot keeps InnoDB from purging the deleted
    # record, as a busy server often does for a while.
    purge_guard = eng.connect().execution_options(isolation_level="REPEATABLE READ")
    purge_guard.execute(sa.text("SELECT count(*) FROM follows")).scalar_one()
    deleter = Session(eng)
    at_parents, go = threading.Event(), threading.Event()
    w_conn = stale.connection()

    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if conn is w_conn and not at_parents.is_set() and _is_parent_lock(statement):
            at_parents.set()
            go.wait(JOIN_TIMEOUT)

    def stale_delete() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched: the row is gone
            stale.delete(copy)
            stale.commit()

    def insert() -> None:
        with Session(eng) as s:
            s.add(Follow(follower_id=1, followed_id=2))
            s.commit()

    sa.event.listen(eng, "before_cursor_execute", hold)
    racers: list[Racer] = []
    try:
        deleter.delete(deleter.get(Follow, (1, 2)))
        deleter.flush()  # holds the follows row (and users 1, 2) until it commits
        racers.append(Racer(stale_delete, "stale deleter").start())
        wait_blocked(eng, 1, *racers)  # its locking read of the old row waits for the deleter
        deleter.commit()
        wait_until(at_parents.is_set, "the stale flush to reach its parent lock")
        racers.append(Racer(insert, "inserter").start())
        # Before the fix the inserter waited here for the stale flush's lock on
        # the deleted record, holding users 1 and 2.
        wait_until(
            lambda: racers[1].done.is_set() or lock_waiters(eng) >= 1,
            "the inserter to finish or to wait for a lock",
        )
        inserter_waited = not racers[1].done.is_set()
        go.set()
        for racer in racers:
            racer.join()
    finally:
        go.set()
        sa.event.remove(eng, "before_cursor_execute", hold)
        for racer in racers:
            racer.done.wait(JOIN_TIMEOUT)
        deleter.close()
        stale.close()
        purge_guard.rollback()
        purge_guard.close()
    assert not inserter_waited
    assert_exact(eng)
    # Serial order: deleter, inserter, stale delete (its parent lock came after
    # the insert's commit, so it read the new row as old state and removed it).
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM follows")).scalar_one() == 0
