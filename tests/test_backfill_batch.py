"""The batch protocol on PostgreSQL: duplicates applied once, exactly-once completion, bounds."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from backfill_project import (
    USER_COUNTERS,
    batch_rows,
    counters_by_key,
    drift,
    lock_users,
    run_rows,
    seed,
    wait_for,
)
from races import Racer, innodb_waiters

from alembic_counterfill import planning, progress
from alembic_counterfill.batch import BatchNotFound, BatchOutcome, mark_failed, run_batch


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url, pool_size=20)
    yield engine
    engine.dispose()


def _plan(engine: sa.Engine, batch_size: int = 50) -> planning.BackfillPlan:
    counters = counters_by_key()
    with engine.begin() as conn:
        return planning.plan(conn, [counters[k] for k in USER_COUNTERS], batch_size)


def _all_at_once(calls: list[tuple[int]], engine: sa.Engine) -> list[BatchOutcome]:
    """Run ``run_batch`` for each batch id in its own thread, released together."""
    counters = counters_by_key()
    barrier = threading.Barrier(len(calls))
    outcomes: list[BatchOutcome] = []
    errors: list[BaseException] = []

    def one(batch_id: int) -> None:
        barrier.wait()
        try:
            outcomes.append(run_batch(engine, counters, batch_id))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return outcomes


def _in_batch(pg: sa.Engine, batch_id: int) -> Callable[[Any], bool]:
    """Whether a user id lies in the batch's key range (read from its row, JSON bounds)."""
    (b,) = [b for b in batch_rows(pg) if b["id"] == batch_id]
    lo = json.loads(b["lo"]) if b["lo"] is not None else None
    hi = json.loads(b["hi"]) if b["hi"] is not None else None
    return lambda uid: (lo is None or uid >= lo) and (hi is None or uid < hi)


def test_same_batch_delivered_twice_in_a_row_is_applied_once(pg: sa.Engine) -> None:
    seed(pg, users=100)
    plan = _plan(pg)
    counters = counters_by_key()
    inside = _in_batch(pg, plan.batch_ids[0])
    wrong = {d[0] for d in drift(pg) if inside(d[0])}  # the test's own COUNT/SUM
    first = run_batch(pg, counters, plan.batch_ids[0])
    second = run_batch(pg, counters, plan.batch_ids[0])
    assert first.applied and first.rows_changed == len(wrong) > 0
    assert not second.applied and second.rows_changed == 0
    (run,) = run_rows(pg)
    assert run["batches_done"] == 1 and run["rows_changed"] == len(wrong)
    assert [d for d in drift(pg) if inside(d[0])] == []  # exact once, not twice


def test_same_batch_delivered_concurrently_is_applied_once(pg: sa.Engine) -> None:
    seed(pg, users=100)
    plan = _plan(pg)
    inside = _in_batch(pg, plan.batch_ids[0])
    wrong = {d[0] for d in drift(pg) if inside(d[0])}
    outcomes = _all_at_once([(plan.batch_ids[0],)] * 8, pg)
    assert sum(o.applied for o in outcomes) == 1
    (run,) = run_rows(pg)
    assert run["batches_done"] == 1
    assert run["rows_changed"] == len(wrong) == sum(o.rows_changed for o in outcomes)
    assert [d for d in drift(pg) if inside(d[0])] == []


def test_last_batches_committing_together_complete_the_run_exactly_once(pg: sa.Engine) -> None:
    seed(pg, users=200)
    for _ in range(5):
        with pg.begin() as conn:  # a fresh recount run each round
            conn.execute(sa.update(progress.counters_table).values(state=progress.ACTIVE))
        plan = _plan(pg)
        outcomes = _all_at_once([(b,) for b in plan.batch_ids], pg)
        assert all(o.applied for o in outcomes)
        assert sum(o.run_finished for o in outcomes) == 1
        run = run_rows(pg)[-1]
        assert run["state"] == progress.DONE
        assert run["batches_done"] == run["batches_total"] == len(plan.batch_ids)
    with pg.connect() as conn:
        assert {r["state"] for r in progress.counter_rows(conn).values()} == {progress.ACTIVE}
    assert drift(pg) == []


def test_a_batch_waits_for_writers_holding_its_parents(pg: sa.Engine) -> None:
    """Step 2 of the protocol: the range lock queues behind a writer's uncommitted delta."""
    seed(pg, users=100)
    plan = _plan(pg)
    counters = counters_by_key()
    writer = pg.connect()
    batch = None
    try:  # a failure must not leave the writer's locks (and the batch thread) behind
        # A writer that has inserted a follow and applied its delta, not yet committed.
        writer.execute(sa.text("INSERT INTO follows (follower_id, followed_id) VALUES (3, 7)"))
        writer.execute(
            sa.text("UPDATE users SET followers_count = followers_count + 1 WHERE id = 7")
        )
        batch = Racer(lambda: run_batch(pg, counters, plan.batch_ids[0]), "batch").start()
        wait_for(lambda: _waiting_on_locks(pg), what="the batch to wait for user 7")
        assert not batch.done.is_set()
        writer.commit()
    finally:
        writer.rollback()
        writer.close()
        if batch is not None:
            batch.done.wait(60)
    assert batch.join().applied
    assert [d for d in drift(pg) if d[0] < 51] == []  # the batch saw the committed follow


def _waiting_on_locks(engine: sa.Engine) -> int:
    """Sessions waiting for a row lock in the batch's parent-locking statement."""
    with engine.connect() as conn:
        if engine.dialect.name != "postgresql":  # MariaDB: its FOR UPDATE, on our database
            return len(innodb_waiters(conn))
        text = "FOR NO KEY UPDATE"
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE :q"
            ),
            {"q": f"%{text}%"},
        ).scalar_one()


def test_statement_timeout_bounds_a_batch_and_failure_is_recorded(pg: sa.Engine) -> None:
    seed(pg, users=100)
    plan = _plan(pg)
    holder = lock_users(pg, [10])
    try:
        timed_out = "statement timeout" if pg.dialect.name == "postgresql" else "Lock wait timeout"
        with pytest.raises(sa.exc.OperationalError, match=timed_out):
            run_batch(pg, counters_by_key(), plan.batch_ids[0], statement_timeout_ms=300)
    finally:
        holder.rollback()
        holder.close()
    (first,) = [b for b in batch_rows(pg) if b["id"] == plan.batch_ids[0]]
    assert first["state"] == progress.BATCH_PENDING  # rolled back: nothing half-written
    assert mark_failed(pg, plan.batch_ids[0], "QueryCanceled: statement timeout")
    (run,) = run_rows(pg)
    assert run["batches_failed"] == 1 and run["state"] == progress.RUNNING
    outcome = run_batch(pg, counters_by_key(), plan.batch_ids[0])  # a later delivery succeeds
    assert outcome.applied
    (run,) = run_rows(pg)
    assert run["batches_failed"] == 0 and run["batches_done"] == 1


def test_unknown_batch_id_is_reported(pg: sa.Engine) -> None:
    seed(pg, users=5)
    _plan(pg)
    with pytest.raises(BatchNotFound, match="batch 999"):
        run_batch(pg, counters_by_key(), 999)


def test_a_done_batch_is_never_marked_failed(pg: sa.Engine) -> None:
    seed(pg, users=60)
    plan = _plan(pg)
    run_batch(pg, counters_by_key(), plan.batch_ids[0])
    assert not mark_failed(pg, plan.batch_ids[0], "late failure of a duplicate")
    (first,) = [b for b in batch_rows(pg) if b["id"] == plan.batch_ids[0]]
    assert first["state"] == progress.DONE and first["error"] is None


def test_a_postgresql_piece_sends_two_statements_between_its_parents_lock_and_commit(
    pg_url: str,
) -> None:
    """While a piece holds its parents, it sends the recount and the bookkeeping in two statements.

    Application writes to those parents wait until the piece commits, and on
    a busy machine each round trip costs milliseconds (docs/performance.md),
    so the recount travels in the run row's read (a data-modifying CTE, still
    a statement of its own after the lock) instead of before it.
    """
    pg = sa.create_engine(pg_url)
    try:
        seed(pg, users=120)
        counters = counters_by_key()
        with pg.begin() as conn:
            plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 60)
        wrong = {d[0] for d in drift(pg)}  # the test's own COUNT/SUM
        sent: list[str] = []

        @sa.event.listens_for(pg, "before_cursor_execute")
        def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            sent.append(" ".join(statement.split()))

        @sa.event.listens_for(pg, "commit")
        def note_commit(conn: Any) -> None:
            sent.append("COMMIT")

        outcomes = [run_batch(pg, counters, b) for b in plan.batch_ids]
        assert drift(pg) == []
        assert sum(o.rows_changed for o in outcomes) == len(wrong) > 0
        assert outcomes[-1].run_finished
        locks = [
            i for i, s in enumerate(sent) if s.startswith("SELECT count(*)") and "FOR NO KEY" in s
        ]
        assert len(locks) == len(plan.batch_ids) == 2
        for i in locks:
            commit = sent.index("COMMIT", i)
            between = sent[i + 1 : commit]
            # The run row's read with the recount, then the run row's update
            # (the last piece of the run also completes it: more statements).
            assert between[0].startswith("WITH recount AS (UPDATE users SET")
            assert between[1].startswith("UPDATE counterfill_runs SET")
            if i == locks[0]:
                assert len(between) == 2
    finally:
        pg.dispose()


def test_pieces_of_a_batch_reuse_one_recount_statement(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch cut into many pieces builds its recount once per shape, not once per piece.

    Building the recount (joins, grouped subqueries, then SQLAlchemy's cache
    key of the whole construct) was milliseconds of Python per piece; the
    pieces now differ only in bound parameters (alembic_counterfill.pieces).
    """
    from alembic_counterfill import pacing, pieces, sql

    pg = sa.create_engine(pg_url)
    seed(pg, users=120)
    plan = _plan(pg, batch_size=200)
    counters = counters_by_key()
    wrong = {d[0] for d in drift(pg)}  # the test's own COUNT/SUM
    with pg.begin() as conn:  # small pieces that do not grow
        conn.execute(sa.update(progress.runs_table).values(chunk_size=10))
    built: list[Any] = []
    real = sql.recount_statements

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sql, "recount_statements", counting)
    monkeypatch.setattr(pieces, "_built", {})  # nothing built by earlier tests
    recounts: list[str] = []

    @sa.event.listens_for(pg, "before_cursor_execute")
    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("WITH recount AS"):
            recounts.append(statement)

    steady = pacing.Pacing(min_size=10, max_growth=1.0, idle_growth=1.0)
    outcomes = [run_batch(pg, counters, b, pacing=steady) for b in plan.batch_ids]
    assert drift(pg) == []
    assert sum(o.rows_changed for o in outcomes) == len(wrong) > 0
    assert outcomes[-1].run_finished
    assert len(recounts) >= 10  # the batch ran in many pieces...
    # ...built from at most one recount per shape: first piece (open lower
    # bound), middle pieces, and the last piece (open upper bound).
    assert 1 <= len(built) <= 3
    pg.dispose()
