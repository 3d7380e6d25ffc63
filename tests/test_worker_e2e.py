"""Real ``dramatiq alembic_counterfill.worker`` subprocesses, real PostgreSQL, Redis and RabbitMQ.

Each test judges the result against an independent COUNT/SUM (backfill_project.drift)
and the bookkeeping rows, never against the library's own figures alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import sqlalchemy as sa
from backfill_project import (
    TERMINATED,
    USER_COUNTERS,
    Project,
    Writers,
    batch_rows,
    counters_by_key,
    drift,
    lock_users,
    make_read_only,
    make_writable,
    run_rows,
    seed,
    states,
    terminate,
    wait_blocked_workers,
    wait_for,
)
from conftest import AMQP_URL, REDIS_BASE, delete_namespace, unavailable

from alembic_counterfill import planning, progress
from alembic_counterfill.actors import broker_from_url, send_batches

APPLIED = re.compile(r"batch (\d+) users\.\S+ \[.*; batch done")  # a range's last piece
DUPLICATE = re.compile(r"batch (\d+) already done")


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url, pool_size=12)
    yield engine
    engine.dispose()


@pytest.fixture
def project(tmp_path: Path, server_url: str, redis_url: str) -> Project:
    return Project(tmp_path / "project", server_url, broker_url=redis_url)


def _applied(*logs: str) -> Tally[int]:
    return Tally(int(x) for log in logs for x in APPLIED.findall(log))


def _run_done(engine: sa.Engine) -> bool:
    runs = run_rows(engine)
    return bool(runs) and all(r["state"] == progress.DONE for r in runs)


def test_live_orm_writes_during_backfill_leave_no_drift_and_no_deadlock(
    tmp_path: Path, server_url: str, redis_url: str, pg: sa.Engine
) -> None:
    users = 6000
    seed(pg, users=users, follows=4, posts=2)
    project = Project(tmp_path / "p", server_url, broker_url=redis_url, batch_size=40)
    with project.worker() as worker, Writers(pg, users) as writers:
        wait_for(lambda: writers.writes >= 30 or writers.errors, what="writers to get going")
        writers.counting.set()
        result = project.cli("enqueue", "--wait")
        writers.counting.clear()
    assert result.exit_code == 0, result.output
    assert writers.errors == []  # no deadlock, no other error in any writer
    assert writers.writes_while_counting > 0
    assert drift(pg) == []
    batches = batch_rows(pg)
    assert len(batches) == 150 and all(b["state"] == progress.DONE for b in batches)
    assert all(b["attempts"] == 1 for b in batches)  # no batch retried (no deadlock there)
    assert "deadlock" not in worker.log.lower()
    status = json.loads(project.cli("status", "--json").output)
    by_key = {s["counter"]: s["state"] for s in status}
    # orgs.members_count was never requested nor backfilled here: unknown, not active.
    assert by_key == {
        **dict.fromkeys(USER_COUNTERS, progress.ACTIVE),
        "orgs.members_count": "unknown",
    }
    users_status = [s for s in status if s["counter"] in USER_COUNTERS]
    assert all(s["batches_done"] == s["batches_total"] == 150 for s in users_status)


def test_sigkill_mid_backfill_then_new_worker_and_enqueue_completes_once(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=2000)
    holder = lock_users(pg, [530, 1030])  # stalls batches [501, 551) and [1001, 1051)
    first = project.worker()
    try:
        assert project.cli("enqueue").exit_code == 0
        wait_blocked_workers(pg, 2, first)  # both worker threads
    finally:
        first.kill()  # mid-batch: both threads hold a batch transaction open
        holder.rollback()
        holder.close()
    (run,) = run_rows(pg)
    assert run["batches_done"] < run["batches_total"] == 40
    with project.worker() as second:
        result = project.cli("enqueue", "--wait")
        assert result.exit_code == 0, result.output
    (run,) = run_rows(pg)
    done = [b for b in batch_rows(pg) if b["state"] == progress.DONE]
    assert run["state"] == progress.DONE and run["batches_done"] == len(done) == 40
    assert run["rows_changed"] == sum(b["rows_changed"] for b in done)
    applied = _applied(first.log, second.log)
    assert sorted(applied) == sorted(b["id"] for b in done)
    assert set(applied.values()) == {1}  # no batch applied twice
    assert drift(pg) == []
    assert set(states(pg).values()) == {progress.ACTIVE}


def test_redis_flushed_mid_backfill_then_enqueue_completes(
    project: Project, pg: sa.Engine, redis_url: str
) -> None:
    seed(pg, users=2000)
    holder = lock_users(pg, [530, 1030])
    with project.worker() as worker:
        try:
            assert project.cli("enqueue").exit_code == 0
            wait_blocked_workers(pg, 2, worker)  # both worker threads
            namespace = parse_qs(urlsplit(redis_url).query)["namespace"][0]
            client = redis.Redis.from_url(REDIS_BASE)
            queued = client.llen(f"{namespace}:{project.queue}")
            assert queued > 0  # messages wait behind the two blocked batches
            # Every key of this test's namespace (queues, acks, heartbeats) is lost.
            assert delete_namespace(client, namespace) > 0
            client.close()
        finally:
            holder.rollback()
            holder.close()
        assert not _run_done(pg)
        result = project.cli("enqueue", "--wait")
        assert result.exit_code == 0, result.output
    assert _run_done(pg)
    assert drift(pg) == []


def test_same_message_delivered_twice_concurrently_is_applied_once(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=300)
    counters = counters_by_key()
    with pg.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)
    holder = lock_users(pg, [10])
    broker = broker_from_url(project.broker_url or "", sending=True)
    with project.worker() as worker:
        try:
            send_batches(broker, project.queue, [plan.batch_ids[0]] * 2)
            # one copy waits on user 10, the other on the batch row the first one holds
            wait_blocked_workers(pg, 2, worker)
        finally:
            holder.rollback()
            holder.close()
        send_batches(broker, project.queue, plan.batch_ids + plan.batch_ids)
        wait_for(lambda: _run_done(pg), what="the run to complete")
        wait_for(
            lambda: len(DUPLICATE.findall(worker.log)) == len(plan.batch_ids) + 2,
            what="every duplicate to be skipped",
        )
        log = worker.log
    broker.close()
    applied = _applied(log)
    assert sorted(applied) == sorted(plan.batch_ids) and set(applied.values()) == {1}
    (run,) = run_rows(pg)
    assert run["batches_done"] == run["batches_total"] == len(plan.batch_ids)
    assert drift(pg) == []


def test_killed_database_connection_is_retried_and_the_run_completes(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=300)
    holder = lock_users(pg, [10])
    with project.worker(COUNTERFILL_MIN_BACKOFF="100") as worker:
        try:
            assert project.cli("enqueue").exit_code == 0
            (pid,) = wait_blocked_workers(pg, 1, worker)
            terminate(pg, pid)
        finally:
            holder.rollback()
            holder.close()
        wait_for(lambda: _run_done(pg), what="the run to complete after the retry")
        log = worker.log
    assert "will retry" in log and TERMINATED[pg.dialect.name] in log
    assert drift(pg) == []
    assert all(b["state"] == progress.DONE for b in batch_rows(pg))


def test_batch_out_of_retries_is_marked_failed_then_enqueue_retries_it(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=200)
    make_read_only(pg, 77)  # every write to user 77 fails until the trigger is dropped
    tuning = {"COUNTERFILL_MAX_RETRIES": "2", "COUNTERFILL_MIN_BACKOFF": "50"}
    with project.worker(**tuning) as worker:
        failed = project.cli("enqueue", "--wait")
        assert failed.exit_code == 1
        assert "1 batches failed" in failed.output and "user 77 is read-only" in failed.output
        assert worker.log.count("will retry") == 2
        status = {s["counter"]: s for s in json.loads(project.cli("status", "--json").output)}
        followers = status["users.followers_count"]
        assert followers["state"] == progress.FAILED and followers["batches_failed"] == 1
        assert "user 77 is read-only" in followers["last_error"]
        make_writable(pg, 77)
        result = project.cli("enqueue", "--wait")
    assert result.exit_code == 0, result.output
    assert "resuming run" in result.output and "1 of 4 batches" in result.output
    assert drift(pg) == []
    assert set(states(pg).values()) == {progress.ACTIVE}


def test_broker_unreachable_leaves_counters_pending_and_a_later_enqueue_works(
    tmp_path: Path, server_url: str, pg: sa.Engine, redis_url: str
) -> None:
    seed(pg, users=100)
    project = Project(tmp_path / "p", server_url, broker_url="redis://127.0.0.1:1/0")
    result = project.cli("enqueue")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach the broker at redis://")
    assert set(states(pg).values()) == {progress.PENDING}
    assert run_rows(pg) == []
    with project.worker(COUNTERFILL_BROKER_URL=redis_url):
        result = project.cli("enqueue", "--wait", env={"COUNTERFILL_BROKER_URL": redis_url})
    assert result.exit_code == 0, result.output
    assert drift(pg) == []


def test_rabbitmq_worker_runs_a_backfill(tmp_path: Path, server_url: str, pg: sa.Engine) -> None:
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except Exception as exc:
        unavailable("RabbitMQ", exc)
    seed(pg, users=400)
    project = Project(tmp_path / "p", server_url, broker_url=AMQP_URL)
    try:
        with project.worker():
            result = project.cli("enqueue", "--wait", "--verify")
        assert result.exit_code == 0, result.output
        assert "no drift" in result.output
        assert drift(pg) == []
    finally:
        channel = connection.channel()
        for name in (project.queue, f"{project.queue}.DQ", f"{project.queue}.XQ"):
            channel.queue_delete(name)
        connection.close()


def test_old_models_worker_refuses_a_new_runs_batches_and_new_code_completes_them(
    tmp_path: Path, server_url: str, redis_url: str, pg: sa.Engine
) -> None:
    """Rolling deploy: a worker still on the old models must not recount with them."""
    seed(pg, users=400)
    new = Project(tmp_path / "new", server_url, broker_url=redis_url)
    old = Project(
        tmp_path / "old",
        server_url,
        broker_url=redis_url,
        queue=new.queue,
        metadata="backfill_models_old:Base",
    )
    with old.worker(COUNTERFILL_MIN_BACKOFF="200", COUNTERFILL_MAX_BACKOFF="400") as stale:
        assert new.cli("enqueue").exit_code == 0
        wait_for(
            lambda: sum(1 for b in batch_rows(pg) if b["refusals"]) >= 3,
            what="the old worker to refuse batches",
        )
        assert all(b["state"] != progress.DONE for b in batch_rows(pg))
        status = json.loads(new.cli("status", "--json").output)
        posts = next(s for s in status if s["counter"] == "users.posts_count")
        assert posts["state"] == progress.BACKFILLING and posts["batches_waiting"] >= 3
        assert "refused by workers running another definition" in posts["hint"]
        with new.worker() as current:
            wait_for(lambda: _run_done(pg), timeout=120, what="the new worker to finish the run")
    assert "refused" in stale.log and "another definition of users.posts_count" in stale.log
    assert _applied(stale.log) == Tally()  # the old worker applied nothing
    assert sorted(_applied(current.log)) == sorted(b["id"] for b in batch_rows(pg))
    assert drift(pg) == []  # exact under the new definition (published posts)
    assert set(states(pg).values()) == {progress.ACTIVE}
