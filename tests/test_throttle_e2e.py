"""Throttling and re-sending end to end: real worker subprocesses, PostgreSQL locks, `status`.

Each test holds real locks in test transactions (closed in ``finally``),
waits on catalog facts (who blocks whom), never on durations, and judges the
run against an independent COUNT(*) (backfill_project.drift).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from backfill_project import Project, batch_rows, drift, run_rows, seed, wait_for
from conftest import AMQP_URL, unavailable

from alembic_counterfill import progress

pytestmark = pytest.mark.timeout(240)

APPLIED = re.compile(r"batch (\d+) users\.\S+ \[.*; batch done")
WAITERS = "1 session(s) waited on the batch's locks"


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


def _project(tmp_path: Path, pg_url: str, redis_url: str, **settings: object) -> Project:
    project = Project(tmp_path / "p", pg_url, broker_url=redis_url, batch_size=1000)
    with open(project.ini, "a") as ini:
        ini.writelines(f"{k} = {v}\n" for k, v in settings.items())
    return project


def _hold(engine: sa.Engine, user_id: int) -> tuple[sa.Connection, int]:
    """An open transaction holding ``FOR UPDATE`` on one user, and its backend pid."""
    conn = engine.connect()
    conn.execute(sa.text("SELECT id FROM users WHERE id = :id FOR UPDATE"), {"id": user_id})
    return conn, conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()


def _blocked_by(engine: sa.Engine, holders: Sequence[int]) -> dict[int, int]:
    """``{session pid: holder pid}`` for sessions waiting directly on one of ``holders``."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(pid)) > 0"
            )
        ).all()
    return {pid: b for pid, blockers in rows for b in blockers if b in holders}


def _ranges(engine: sa.Engine) -> list[tuple[int, int | None]]:
    """Each planned batch's ``[lo, hi)`` as user ids (``lo`` of an open range: 1)."""

    def bound(text: str | None) -> int | None:
        return None if text is None else int(json.loads(text))

    rows = sorted(batch_rows(engine), key=lambda b: b["id"])
    return [(bound(b["lo"]) or 1, bound(b["hi"])) for b in rows]


def _status(project: Project) -> tuple[str, list[dict[str, Any]]]:
    text = project.cli("status")
    data = project.cli("status", "--json")
    assert text.exit_code == 0 and data.exit_code == 0, text.output + data.output
    return text.output, json.loads(data.output)


def _completed_exactly_once(engine: sa.Engine, *logs: str) -> None:
    """The run is done, every batch applied once, none failed, and no drift (independent COUNT)."""
    (run,) = run_rows(engine)
    batches = batch_rows(engine)
    assert run["state"] == progress.DONE and run["batches_failed"] == 0
    assert run["batches_done"] == run["batches_total"] == len(batches)
    assert [(b["state"], b["attempts"]) for b in batches] == [(progress.DONE, 1)] * len(batches)
    applied = Tally(int(x) for log in logs for x in APPLIED.findall(log))
    assert sorted(applied) == sorted(b["id"] for b in batches)
    assert set(applied.values()) == {1}
    assert drift(engine) == []


def _app_follow(
    engine: sa.Engine, follower: int, followed: int, done: list[BaseException | None], both: bool
) -> threading.Thread:
    """A live follow as the application writes it: the insert, then its counter deltas.

    ``both``: also ``following_count`` of the follower (else only the followed
    user's delta, the one that waits on a batch). The outcome lands in ``done``.
    """

    def write() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.text("INSERT INTO follows (follower_id, followed_id) VALUES (:a, :b)"),
                    {"a": follower, "b": followed},
                )
                conn.execute(
                    sa.text("UPDATE users SET followers_count = followers_count + 1 WHERE id = :b"),
                    {"b": followed},
                )
                if both:
                    conn.execute(
                        sa.text(
                            "UPDATE users SET following_count = following_count + 1 WHERE id = :a"
                        ),
                        {"a": follower},
                    )
            done.append(None)
        except BaseException as exc:  # surfaced by the test
            done.append(exc)

    return threading.Thread(target=write)


def test_an_app_write_waiting_on_a_batch_makes_it_back_off_and_status_says_why(
    tmp_path: Path, pg_url: str, redis_url: str, pg: sa.Engine
) -> None:
    """An application session waits on a batch's parent locks: the batch backs off, says so."""
    seed(pg, users=2000)
    # No lock timeout: the batch waits on the test's gate (holding the parents
    # it locked before it), so the application write below waits on the batch.
    project = _project(tmp_path, pg_url, redis_url, lock_timeout_ms=0)
    assert project.cli("enqueue").exit_code == 0
    (lo1, _), (lo2, _) = _ranges(pg)
    app_user = lo2 + 10
    gates: list[sa.Connection] = []
    app_done: list[BaseException | None] = []

    app = _app_follow(pg, 3, app_user, app_done, both=False)
    try:
        gate1, pid1 = _hold(pg, lo1 + 500)  # keeps batch 1 (and the run) open
        gates.append(gate1)
        gate2, pid2 = _hold(pg, lo2 + 500)
        gates.append(gate2)
        with project.worker(threads=2) as worker:
            wait_for(
                lambda: set(_blocked_by(pg, [pid1, pid2]).values()) == {pid1, pid2},
                what="both batches to wait on the gates",
            )
            batch2_pid = next(p for p, h in _blocked_by(pg, [pid2]).items() if h == pid2)
            app.start()
            wait_for(lambda: _blocked_by(pg, [batch2_pid]), what="the app write to wait")
            gate2.rollback()  # batch 2 recounts, sees the waiting app session, backs off
            wait_for(lambda: app_done, what="the app write to go through")
            assert app_done == [None]
            wait_for(lambda: run_rows(pg)[0]["batches_done"] == 1, what="batch 2 to finish")

            (run,) = run_rows(pg)
            assert run["throttle_reason"] == WAITERS
            assert run["chunk_size"] < 1000  # smaller from now on
            text, data = _status(project)
            assert f"throttled: {WAITERS}" in text
            users = [s for s in data if s["counter"].startswith("users.")]
            assert users and all(
                s["activity"] == "throttled" and s["throttled"] == WAITERS for s in users
            )
            assert f"; throttled: {WAITERS}" in worker.log  # the batch's log line

            gate1.rollback()
            wait_for(lambda: run_rows(pg)[0]["state"] == progress.DONE, what="the run to end")
        log = worker.log
    finally:
        for gate in gates:
            gate.rollback()
            gate.close()
        if app.is_alive():
            app.join(timeout=60)
    _completed_exactly_once(pg, log)  # the app's follow counted once, by its own delta


PIECE = re.compile(
    r"batch \d+ users\.\S+ \[(\S+), (\S+)\) parents=(\d+) rows_changed=\d+ in [\d.]+s"
    r"(?:; next size (\d+) \((idle|contended) target ([\d.]+)s\))?"
    r"(; throttled: [^;\n]+)?"
)


def test_a_waiter_mid_run_switches_pieces_from_the_idle_target_to_the_short_one(
    tmp_path: Path, pg_url: str, redis_url: str, pg: sa.Engine
) -> None:
    """Pieces aim at idle_batch_seconds until a session waits on one, then at batch_seconds.

    One worker thread runs one range of 5,000 users in pieces. A test
    transaction (the gate) holds user 1201, inside the second piece, so that
    piece stops there holding users 1001-1200; an application write then
    waits on user 1101. Judged on what the worker logged for each piece
    (sizes and the target each next size aimed at) and the run row, never on
    durations; the result against an independent COUNT(*).
    """
    seed(pg, users=5000, follows=2, posts=1)
    # One range of 5,000 parents; no lock timeout, so the piece waits on the gate.
    project = Project(tmp_path / "p", pg_url, broker_url=redis_url, batch_size=5000)
    with open(project.ini, "a") as ini:
        ini.write("lock_timeout_ms = 0\n")
    assert project.cli("enqueue").exit_code == 0
    assert len(_ranges(pg)) == 1
    app_user, gated_user = 1101, 1201
    app_done: list[BaseException | None] = []

    # Both counters' deltas, as live maintenance writes them (user 3's piece
    # was done before this write).
    app = _app_follow(pg, 3, app_user, app_done, both=True)
    gate, gate_pid = _hold(pg, gated_user)
    try:
        with project.worker(processes=1, threads=1) as worker:
            wait_for(lambda: _blocked_by(pg, [gate_pid]), what="the second piece to hit the gate")
            piece_pid = next(iter(_blocked_by(pg, [gate_pid])))
            app.start()
            wait_for(lambda: _blocked_by(pg, [piece_pid]), what="the app write to wait")
            gate.rollback()  # the piece recounts, sees the waiting app session
            wait_for(lambda: app_done, what="the app write to go through")
            assert app_done == [None]
            wait_for(lambda: run_rows(pg)[0]["state"] == progress.DONE, what="the run to end")
        log = worker.log
    finally:
        gate.rollback()
        gate.close()
        if app.is_alive():
            app.join(timeout=60)
    pieces = PIECE.findall(log)
    assert pieces, log
    ends = [hi for _, hi, *_ in pieces]
    # Piece 1: the first size (1,000 parents), nobody waited: the idle target.
    first, second, *rest = pieces
    assert (first[1], first[2]) == ("1001", "1000")
    assert first[4] == "idle" and float(first[5]) == 1.0 and not first[6]
    # Piece 2 started at user 1001 and is the one the app waited on: its size
    # is halved and the next one aims at the short target (batch_seconds).
    assert second[0] == "1001" and int(second[2]) == int(first[3])
    assert second[6] == f"; throttled: {WAITERS}"
    assert int(second[3]) == int(first[3]) // 2
    assert second[4] == "contended" and float(second[5]) == 0.03
    # Every later piece stays on the short target (sessions waited lately),
    # growing by at most 1.2x a piece, and the range is done.
    assert rest, log
    size = int(second[3])
    for _lo, _hi, parents, next_size, target, seconds, _throttled in rest:
        assert int(parents) <= size
        if next_size:  # the last piece of the range names no next size
            assert target == "contended" and float(seconds) == 0.03
            assert int(next_size) <= size * 1.2 + 1
            size = int(next_size)
    assert ends[-1] == "+inf"
    (run,) = run_rows(pg)
    assert run["throttle_reason"] == WAITERS
    _completed_exactly_once(pg, log)  # the app's follow counted once, by its own delta


def test_a_lock_held_by_the_app_makes_a_batch_give_way_and_status_says_why(
    tmp_path: Path, pg_url: str, redis_url: str, pg: sa.Engine
) -> None:
    """A test transaction holds a parent a batch needs: the batch gives way instead of failing."""
    seed(pg, users=2000)
    project = _project(tmp_path, pg_url, redis_url, lock_timeout_ms=200)
    assert project.cli("enqueue").exit_code == 0
    (_, _), (lo2, _) = _ranges(pg)
    gate, _ = _hold(pg, lo2 + 500)
    try:
        with project.worker(threads=2) as worker:
            wait_for(
                lambda: "stayed locked by other sessions for 200 ms" in worker.log,
                what="a batch to give way",
            )
            wait_for(lambda: run_rows(pg)[0]["batches_done"] == 1, what="batch 1 to finish")
            (run,) = run_rows(pg)
            assert run["state"] == progress.RUNNING
            assert run["chunk_size"] < 1000
            text, data = _status(project)
            reason = "parent rows locked by other sessions (lock_timeout)"
            assert f"throttled: {reason}" in text
            users = [s for s in data if s["counter"].startswith("users.")]
            assert users and all(
                s["activity"] == "throttled" and s["throttled"] == reason for s in users
            )
            assert all(b["state"] != progress.BATCH_FAILED for b in batch_rows(pg))
            gate.rollback()
            wait_for(
                lambda: run_rows(pg)[0]["state"] == progress.DONE,
                timeout=120,
                what="the run to end",
            )
        log = worker.log
    finally:
        gate.rollback()
        gate.close()
    _completed_exactly_once(pg, log)


def _vacuum_pid(engine: sa.Engine, table: str) -> int | None:
    """The backend vacuuming ``table`` (in this test's schema), if any."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_progress_vacuum WHERE relid = to_regclass(:t) LIMIT 1"
            ),
            {"t": table},
        ).scalar()


def test_a_vacuum_on_the_parent_table_pauses_batches_until_it_ends(
    tmp_path: Path, pg_url: str, redis_url: str, pg: sa.Engine
) -> None:
    """A slow manual VACUUM of users: batches pause, status and log say so, the run completes."""
    seed(pg, users=20000, follows=1, posts=1)
    with pg.begin() as conn:  # many pages of dead tuples: a vacuum that lasts minutes
        conn.execute(sa.text("ALTER TABLE users SET (fillfactor = 10)"))
        conn.execute(sa.text("UPDATE users SET name = name || ''"))
    # One planned range of 20,000 parents, cut into pieces of at most 1,000: the
    # worker checks the health signals between pieces.
    project = Project(tmp_path / "p", pg_url, broker_url=redis_url, batch_size=20000)
    assert project.cli("enqueue").exit_code == 0
    vacuum = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    ended: list[BaseException | None] = []

    def run_vacuum() -> None:
        try:
            with vacuum.connect() as conn:
                # As slow as PostgreSQL allows: 100 ms of sleep per page or so.
                conn.execute(sa.text("SET vacuum_cost_delay = 100"))
                conn.execute(sa.text("SET vacuum_cost_limit = 1"))
                conn.execute(sa.text("VACUUM users"))
            ended.append(None)
        except BaseException as exc:  # cancelled below: expected
            ended.append(exc)

    thread = threading.Thread(target=run_vacuum)
    pid = None
    try:
        thread.start()
        pid = wait_for(lambda: _vacuum_pid(pg, "users"), what="the VACUUM to start")
        with project.worker(threads=1) as worker:
            reason = "VACUUM is running on users"
            wait_for(lambda: f"throttled: {reason}; pausing" in worker.log, what="a pause")
            text, data = _status(project)
            assert f"throttled: {reason}" in text
            users = [s for s in data if s["counter"].startswith("users.")]
            assert users and all(
                s["activity"] == "throttled" and s["throttled"] == reason for s in users
            )
            (run,) = run_rows(pg)
            assert run["state"] == progress.RUNNING  # paused, not failed
            assert _vacuum_pid(pg, "users") == pid  # still the same vacuum
            with pg.connect() as conn:  # end the vacuum, as if it had finished
                assert conn.execute(sa.select(sa.func.pg_cancel_backend(pid))).scalar()
            thread.join(timeout=60)
            wait_for(lambda: run_rows(pg)[0]["state"] == progress.DONE, timeout=120, what="the run")
        log = worker.log
    finally:
        if pid is not None and thread.is_alive():
            with pg.connect() as conn:
                conn.execute(sa.select(sa.func.pg_cancel_backend(pid)))
        thread.join(timeout=60)
        vacuum.dispose()
    assert ended and ended[0] is not None  # the vacuum was cancelled, not finished early
    _completed_exactly_once(pg, log)


def test_rabbitmq_enqueue_resends_only_unsent_stale_or_lost_batches(
    tmp_path: Path, server_url: str, server: sa.Engine
) -> None:
    """RabbitMQ cannot list its messages: the bookkeeping decides what `enqueue` re-sends."""
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except Exception as exc:
        unavailable("RabbitMQ", exc)
    seed(server, users=400)
    project = Project(tmp_path / "p", server_url, broker_url=AMQP_URL, batch_size=50)
    channel = connection.channel()

    def queued() -> int:
        return channel.queue_declare(project.queue, passive=True).method.message_count

    def sends() -> list[int]:
        return [b["sends"] for b in sorted(batch_rows(server), key=lambda b: b["id"])]

    try:
        assert project.cli("enqueue").exit_code == 0
        assert queued() == 8 and sends() == [1] * 8
        again = project.cli("enqueue")  # fresh messages, still queued: nothing re-sent
        assert again.exit_code == 0, again.output
        assert "sent 0 batches" in again.output and "8 still queued from before" in again.output
        assert queued() == 8 and sends() == [1] * 8

        # One batch's message is older than resend_after_seconds and no worker
        # picked it up: it is taken as lost and sent again, alone.
        first = min(b["id"] for b in batch_rows(server))
        b = progress.batches_table
        with server.begin() as conn:
            conn.execute(
                sa.update(b)
                .where(b.c.id == first)
                .values(sent_at=progress.now() - dt.timedelta(hours=1))
            )
        assert project.cli("enqueue").exit_code == 0
        assert queued() == 9 and sends() == [2] + [1] * 7

        # The queue was purged and no worker is alive: every message is gone.
        channel.queue_purge(project.queue)
        result = project.cli("enqueue")
        assert result.exit_code == 0 and "sent 8 batches" in result.output, result.output
        assert queued() == 8 and sends() == [3] + [2] * 7

        with project.worker(threads=2) as worker:
            wait_for(lambda: run_rows(server)[0]["state"] == progress.DONE, what="the run to end")
        log = worker.log
        _completed_exactly_once(server, log)
    finally:
        for name in (project.queue, f"{project.queue}.DQ", f"{project.queue}.XQ"):
            channel.queue_delete(name)
        connection.close()


def test_replica_lag_above_the_bound_pauses_batches_until_the_replica_catches_up(
    tmp_path: Path, redis_url: str
) -> None:
    """A real streaming replica whose replay is paused: batches pause, status says so."""
    from replica import ReplicaPair

    pair = ReplicaPair()
    try:
        pair.__enter__()
    except Exception as exc:
        unavailable("a private PostgreSQL primary with a streaming replica", exc)
    primary = sa.create_engine(pair.url(pair.primary_port))
    try:
        seed(primary, users=5000, follows=1, posts=1)
        url = pair.url(pair.primary_port)
        project = Project(tmp_path / "p", url, broker_url=redis_url, batch_size=5000)
        with open(project.ini, "a") as ini:
            ini.write("max_replica_lag_seconds = 1\n")
        assert project.cli("enqueue").exit_code == 0
        pair.replay(paused=True)

        def lagging() -> bool:
            with primary.begin() as conn:  # some WAL for the replica to fall behind on
                conn.execute(sa.text("UPDATE users SET name = name WHERE id = 1"))
            return (pair.lag_seconds(primary) or 0) > 2

        wait_for(lagging, what="the replica to lag")
        with project.worker(threads=1) as worker:
            wait_for(
                lambda: re.search(r"throttled: replica lag [\d.]+s above 1s; pausing", worker.log),
                what="a pause on replica lag",
            )
            text, data = _status(project)
            assert re.search(r"throttled: replica lag [\d.]+s above 1s", text), text
            users = [s for s in data if s["counter"].startswith("users.")]
            assert users and all(
                s["activity"] == "throttled"
                and re.fullmatch(r"replica lag [\d.]+s above 1s", s["throttled"])
                for s in users
            )
            assert run_rows(primary)[0]["state"] == progress.RUNNING
            pair.replay(paused=False)
            wait_for(
                lambda: run_rows(primary)[0]["state"] == progress.DONE,
                timeout=120,
                what="the run to end once the replica caught up",
            )
        log = worker.log
        _completed_exactly_once(primary, log)
    finally:
        primary.dispose()
        pair.__exit__()
