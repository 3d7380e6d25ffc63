"""Deterministic races of buffered counters: a recount meets a writer's uncommitted child and delta.

A writer's child row and its delta row commit together. A backfill batch or
``verify --fix`` recounting the writer's parent must therefore count the
child and remove the delta in ONE snapshot, or neither (DESIGN.md section 3,
"Hot parents"). These tests force the worst interleaving with locks instead
of hoping for it:

- PostgreSQL: the writer's flush has inserted its child and delta rows (it
  holds only key-share locks on the parent, which the batch's lock does not
  wait for). A third connection holds the row lock of an older delta row of
  the same parent, so the recount statement, once started, blocks on it. The
  writer commits while the statement is blocked; then the holder lets go.
  Recounting in two statements (remove the deltas, then recount) would
  count the writer's child in the second statement while its delta stays
  pending: one too many. The one statement sees neither.
- MariaDB: the writer holds a shared lock on its parent (taken before its
  child write); the batch's exclusive parent lock waits for it, so the
  writer commits while the batch is blocked, and the batch folds and
  recounts under its locks afterwards.

Judged against the test's own COUNT(*) (buffered_models.TRUTH_SQL).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from buffered_models import Base, Follow, User, column_drift, drift, pending_count
from races import Racer, holding, race_engine, wait_blocked, wait_until
from sqlalchemy.orm import Session

from alembic_counterfill import counters_of, innodb, innodb_deltas, planning, progress
from alembic_counterfill import fold as folding
from alembic_counterfill.batch import run_batch
from alembic_counterfill.verify import verify

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_inline_folding")]

#: Follows of user 1 committed before the race (their deltas are pending).
EARLIER = 3


@pytest.fixture
def eng(server_url: str) -> Iterator[sa.Engine]:
    engine = race_engine(server_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        progress.ensure_tables(conn)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        s.commit()
        for _ in range(EARLIER):  # one transaction each: one pending delta row each
            s.add(Follow(follower_id=5, followed_id=1))
            s.commit()
    with engine.begin() as conn:  # drift on purpose, behind the library's back
        conn.execute(sa.text("UPDATE users SET followers_count = 100 WHERE id = 1"))
    yield engine
    engine.dispose()


def _followers(engine: sa.Engine) -> tuple[int, int, int]:
    """User 1's (column, pending deltas, COUNT(*) of follows), read by the test."""
    with engine.connect() as conn:
        return (
            conn.scalar(sa.text("SELECT followers_count FROM users WHERE id = 1")),
            conn.scalar(
                sa.text(
                    "SELECT coalesce(sum(followers_count), 0) FROM counterfill_deltas_users "
                    "WHERE parent_id = 1"
                )
            ),
            conn.scalar(sa.text("SELECT count(*) FROM follows WHERE followed_id = 1")),
        )


def _race(eng: sa.Engine, recount: Racer) -> None:
    """Run ``recount`` while a writer's child and delta rows of user 1 are uncommitted.

    The writer (follower 4, outside the recounted parents' locks on
    PostgreSQL) commits while the recount is blocked; then the recount ends.
    """
    writer = Session(eng)
    try:
        writer.add(Follow(follower_id=4, followed_id=1))
        writer.flush()  # child row + delta row, uncommitted
        if eng.dialect.name == "postgresql":
            # An older delta row of user 1, locked: the recount statement blocks on it.
            older = (
                "SELECT id FROM counterfill_deltas_users WHERE parent_id = 1 "
                "ORDER BY id LIMIT 1 FOR UPDATE"
            )
            with holding(eng, older):
                recount.start()
                wait_blocked(eng, 1, recount)
                writer.commit()  # while the recount's statement is under way
        else:
            # The writer's shared lock on user 1 holds the recount's exclusive lock.
            recount.start()
            _wait_locking_users(eng, recount)
            writer.commit()
        recount.join()
    finally:
        writer.close()
        if recount.thread.is_alive():
            recount.done.wait(60)


def _wait_locking_users(engine: sa.Engine, racer: Racer) -> None:
    """MariaDB: wait until ``racer`` runs its exclusive locking read of ``users``.

    ``races.lock_waiters`` reads ``innodb_trx``, where MariaDB does not list
    a wait that starts in the optimizer (a primary-key lookup locks its row
    while the plan is made, state "Statistics"). The writer is idle in its
    transaction, holding user 1 shared, so a locking read of users from
    another session of this database is, while it runs, waiting for it.
    """
    query = sa.text(
        "SELECT count(*) FROM information_schema.processlist WHERE db = database() "
        "AND id <> connection_id() AND command = 'Query' "
        "AND info LIKE '%FROM users%FOR UPDATE%'"
    )

    def check() -> bool:
        if racer.done.is_set():
            racer.join(0)
            raise AssertionError(f"{racer.thread.name} finished instead of waiting for a lock")
        with engine.connect() as conn:
            return bool(conn.scalar(query))

    wait_until(check, f"{racer.thread.name} to wait for user 1's lock")


def _assert_exact_after_both_commit(eng: sa.Engine) -> None:
    column, pending, actual = _followers(eng)
    assert actual == EARLIER + 1
    assert column + pending == actual  # no double count, no loss
    assert drift(eng) == []
    folding.fold(eng, counters_of(Base))
    assert pending_count(eng) == 0
    assert column_drift(eng) == []
    with Session(eng) as s:
        assert s.get(User, 1).followers_count == actual  # type: ignore[union-attr]


def test_a_batch_recount_racing_an_uncommitted_child_and_delta(eng: sa.Engine) -> None:
    counters = {c.key: c for c in counters_of(Base)}
    with eng.begin() as conn:
        plan = planning.plan(conn, list(counters.values()), 2)  # first batch: users [1, 3)
    batch = Racer(lambda: run_batch(eng, counters, plan.batch_ids[0]), "batch")
    _race(eng, batch)
    outcome = batch.join()
    assert outcome.applied
    column, pending, _ = _followers(eng)
    if eng.dialect.name == "postgresql":
        # The statement saw neither the writer's child nor its delta: it kept the delta.
        assert (column, pending) == (EARLIER, 1)
    else:
        # The batch ran after the writer committed: it counted both and folded.
        assert (column, pending) == (EARLIER + 1, 0)
    _assert_exact_after_both_commit(eng)


def test_verify_fix_racing_an_uncommitted_child_and_delta(eng: sa.Engine) -> None:
    counters = counters_of(Base)
    fix = Racer(lambda: verify(eng, counters, fix=True), "verify --fix")
    _race(eng, fix)
    findings = fix.join()
    assert [(f.id, f.column, f.fixed) for f in findings] == [(1, "followers_count", True)]
    _assert_exact_after_both_commit(eng)


def test_adjacent_mariadb_batches_do_not_lock_each_others_deltas(mariadb_url: str) -> None:
    # Two batches on neighbouring ranges [1, 3) and [3, 5) discard their parents'
    # pending deltas. A locking range read of [1, 3) on the deltas' parent_id
    # index also locks the first row past it: user 4's delta, which the second
    # batch must remove. With both batches' recounts also reading one parent
    # past their range, that was a deadlock (seen with real workers). The
    # second batch must not wait at all: its lock waits end after 1 s here.
    engine = race_engine(mariadb_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            progress.ensure_tables(conn)
        with Session(engine) as s:
            s.add_all([User(id=i, name=f"u{i}") for i in range(1, 7)])
            s.commit()
            s.add_all([Follow(follower_id=6, followed_id=2), Follow(follower_id=6, followed_id=4)])
            s.commit()
        assert pending_count(engine) == 2
        counters = [c for c in counters_of(Base) if c.parent_table is User.__table__]
        users, pk = User.__table__, User.__table__.c.id

        first, second = engine.connect(), engine.connect()
        try:
            for conn in (first, second):
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            innodb.read_committed_transaction(first)
            innodb.lock_parents(first, users, pk, 1, 3)
            innodb_deltas.discard_locked(first, counters, 1, 3, read_committed=True)
            innodb.read_committed_transaction(second)
            innodb.lock_parents(second, users, pk, 3, 5)
            # Raises "Lock wait timeout exceeded" (1205) if the first batch locked user 4's delta.
            assert innodb_deltas.discard_locked(second, counters, 3, 5, read_committed=True) == 1
            second.commit()
            first.commit()
        finally:
            first.close()
            second.close()
        assert pending_count(engine) == 0
    finally:
        engine.dispose()
