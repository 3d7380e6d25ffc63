"""Throttling on real PostgreSQL signals, and adaptive transactions inside planned ranges."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from backfill_project import (
    USER_COUNTERS,
    batch_rows,
    counters_by_key,
    drift,
    run_rows,
    seed,
    wait_for,
)

from alembic_counterfill import planning, progress, signals
from alembic_counterfill.batch import BatchOutcome, run_batch
from alembic_counterfill.cli import render_statuses
from alembic_counterfill.pacing import Pacing
from alembic_counterfill.runner import run_inline
from alembic_counterfill.signals import Throttle

THROTTLE = Throttle(lock_timeout_ms=200)


@pytest.fixture
def pg(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url, pool_size=10)
    yield engine
    engine.dispose()


@pytest.fixture
def server(server_url: str) -> Iterator[sa.Engine]:
    """PostgreSQL and MariaDB, for what uses none of PostgreSQL's catalog signals."""
    engine = sa.create_engine(server_url, pool_size=10)
    yield engine
    engine.dispose()


def _plan(engine: sa.Engine, batch_size: int, start: int) -> planning.BackfillPlan:
    counters = counters_by_key()
    with engine.begin() as conn:
        return planning.plan(
            conn,
            [counters[k] for k in USER_COUNTERS],
            batch_size,
            planning.Sizing(start=start),
        )


def test_a_batch_backs_off_a_locked_parent_shows_why_and_completes_once_released(
    pg: sa.Engine,
) -> None:
    seed(pg, users=300)
    plan = _plan(pg, batch_size=100, start=40)  # ranges of 100, transactions of ~40
    counters = counters_by_key()
    sleeps: list[float] = []
    outcome: list[BatchOutcome] = []
    errors: list[BaseException] = []
    writer = pg.connect()
    try:
        # An application transaction that added a follow to user 150 and applied
        # its live delta, and has not committed: it holds user 150's row lock.
        writer.execute(sa.text("INSERT INTO follows (follower_id, followed_id) VALUES (3, 150)"))
        writer.execute(
            sa.text("UPDATE users SET followers_count = followers_count + 1 WHERE id = 150")
        )

        def run() -> None:
            try:
                outcome.append(
                    run_batch(
                        pg,
                        counters,
                        plan.batch_ids[1],  # [101, 201)
                        throttle=THROTTLE,
                        pacing=Pacing(min_size=10),
                        sleep=lambda s: (sleeps.append(s), threading.Event().wait(0.05)),
                    )
                )
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: len(sleeps) >= 2, what="the batch to back off twice")
        with pg.connect() as conn:
            (status,) = progress.statuses(conn, ["users.followers_count"])
        assert status.activity == "throttled"
        assert status.throttled is not None and "locked by other sessions" in status.throttled
        assert "throttled: parent rows locked by other sessions" in render_statuses([status])
        assert thread.is_alive() and not outcome and not errors  # backing off, not failing
        (run,) = run_rows(pg)
        assert run["chunk_size"] < 40  # and shrinking
        writer.commit()
    finally:
        writer.close()
    thread.join(timeout=60)
    assert errors == [] and outcome and outcome[0].applied and outcome[0].yielded is None
    run_inline(pg, counters, plan.batch_ids, throttle=THROTTLE)
    assert drift(pg) == []  # the committed follow of user 150 is counted, exactly once
    (run,) = run_rows(pg)
    assert run["state"] == progress.DONE and run["batches_done"] == run["batches_total"] == 3
    assert all(b["state"] == progress.DONE and b["cursor"] is None for b in batch_rows(pg))
    assert run["parents_done"] == 300


def test_lock_waiters_signal_counts_sessions_blocked_by_this_transaction(pg: sa.Engine) -> None:
    seed(pg, users=10)
    batch = pg.connect()
    waiter_done = threading.Event()
    try:
        batch.execute(sa.text("SELECT id FROM users WHERE id = 5 FOR NO KEY UPDATE"))
        assert signals.lock_waiters(batch) is None

        def app_write() -> None:
            with pg.begin() as conn:
                conn.execute(sa.text("UPDATE users SET posts_count = posts_count WHERE id = 5"))
            waiter_done.set()

        thread = threading.Thread(target=app_write)
        thread.start()

        def waiting() -> str | None:
            # Statistics are snapshotted once per transaction: refresh between polls.
            batch.execute(sa.select(sa.func.pg_stat_clear_snapshot()))
            return signals.lock_waiters(batch)

        wait_for(waiting, what="the app write to wait")
        assert signals.lock_waiters(batch) == "1 session(s) waited on the batch's locks"
    finally:
        batch.rollback()
        batch.close()
    thread.join(timeout=30)
    assert waiter_done.is_set()


def test_health_signals_are_quiet_on_an_idle_primary(pg: sa.Engine) -> None:
    seed(pg, users=10)
    users = counters_by_key()[USER_COUNTERS[0]].parent_table
    with pg.connect() as conn:
        assert signals.autovacuum(conn, users) is None
        assert signals.replica_lag(conn, 30) is None  # no replicas here
        assert signals.health(conn, users, Throttle()) is None


def test_adaptive_transactions_cover_each_range_exactly_once(server: sa.Engine) -> None:
    seed(server, users=1000)
    with server.begin() as conn:  # every counter wrong, so each parent must be rewritten
        conn.execute(sa.text("UPDATE users SET followers_count = 999, posts_count = 999"))
    plan = _plan(server, batch_size=400, start=30)
    outcomes = run_inline(server, counters_by_key(), plan.batch_ids, pacing=Pacing(min_size=10))
    assert drift(server) == []
    (run,) = run_rows(server)
    assert run["state"] == progress.DONE and run["parents_done"] == 1000
    assert run["batches_total"] == 3 and len(outcomes) == 3
    assert sum(o.rows_changed for o in outcomes) == run["rows_changed"] >= 1000
    assert 10 <= run["chunk_size"] <= 400


def test_rate_limit_books_time_on_the_run(server: sa.Engine) -> None:
    seed(server, users=200)
    counters = counters_by_key()
    with server.begin() as conn:
        plan = planning.plan(
            conn,
            [counters[k] for k in USER_COUNTERS],
            100,
            planning.Sizing(start=50, max_rows_per_second=100.0),
        )
    sleeps: list[float] = []
    run_batch(server, counters, plan.batch_ids[0], sleep=sleeps.append)
    # 100 parents at 100/s: the pieces booked one second of the run's timeline,
    # and the worker waited out the first piece's booking before the second.
    assert sleeps and 0.2 < sleeps[0] <= 0.5
    (run,) = run_rows(server)
    assert run["rate_next_at"] is not None and run["max_rows_per_second"] == 100.0
