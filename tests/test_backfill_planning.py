"""Planning: key ranges from the pk index, one run per table, records before messages, resuming."""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid

import backfill_models as m
import pytest
import sqlalchemy as sa
from backfill_project import USER_COUNTERS, batch_rows, counters_by_key, drift, run_rows, seed
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from alembic_counterfill import heartbeat, planning, progress
from alembic_counterfill.actors import BATCH_ACTOR, send_batches
from alembic_counterfill.batch import mark_failed, run_batch
from alembic_counterfill.errors import CounterfillError, UnknownCounterError
from alembic_counterfill.runner import run_inline


def _plan(engine: sa.Engine, keys: list[str], batch_size: int = 50) -> planning.BackfillPlan:
    counters = counters_by_key()
    with engine.begin() as conn:
        return planning.plan(conn, [counters[k] for k in keys], batch_size)


def _ranges(engine: sa.Engine, pk: sa.Column) -> list[tuple[object, object]]:
    rows = sorted(batch_rows(engine), key=lambda r: (r["run_id"], r["seq"]))
    return [(planning.decode_key(pk, r["lo"]), planning.decode_key(pk, r["hi"])) for r in rows]


def test_batches_partition_integer_keys_with_gaps(engine: sa.Engine) -> None:
    m.Base.metadata.create_all(engine)
    ids = sorted({1, 2, 3, 10, 11, 500, 501, 502, 9_999, *range(1_000, 1_230, 3)})
    with engine.begin() as conn:
        conn.execute(sa.insert(m.User), [{"id": i} for i in ids])
    _plan(engine, USER_COUNTERS, batch_size=7)
    ranges = _ranges(engine, m.User.__table__.c.id)
    assert len(ranges) == math.ceil(len(ids) / 7)
    assert ranges[0][0] is None and ranges[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    for lo, hi in ranges:
        inside = [i for i in ids if (lo is None or i >= lo) and (hi is None or i < hi)]
        assert 1 <= len(inside) <= 7


def test_uuid_keys_are_walked_and_backfilled(engine: sa.Engine) -> None:
    seed(engine, users=0, orgs=40, members=5)
    _plan(engine, ["orgs.members_count"], batch_size=6)
    ranges = _ranges(engine, m.Org.__table__.c.id)
    assert len(ranges) == math.ceil(40 / 6)
    assert all(isinstance(lo, uuid.UUID) for lo, _ in ranges[1:])
    org_id = m.Org.__table__.c.id
    with engine.begin() as conn:  # the database's own UUID order (MariaDB's differs from Python's)
        for lo, hi in ranges:
            n = sa.select(sa.func.count()).select_from(m.Org.__table__)
            if lo is not None:
                n = n.where(org_id >= lo)
            if hi is not None:
                n = n.where(org_id < hi)
            assert 1 <= conn.execute(n).scalar_one() <= 6
    batches = [r["id"] for r in batch_rows(engine)]
    run_inline(engine, counters_by_key(), batches)
    assert drift(engine) == []


def test_one_run_per_parent_table_covers_all_its_counters(engine: sa.Engine) -> None:
    seed(engine, users=120, orgs=10)
    plan = _plan(engine, [*USER_COUNTERS, "orgs.members_count"], batch_size=50)
    runs = {r["table_name"]: r for r in run_rows(engine)}
    assert set(runs) == {"users", "orgs"}
    assert runs["users"]["counter_keys"].split(",") == sorted(USER_COUNTERS)
    assert runs["users"]["batches_total"] == 3 and runs["orgs"]["batches_total"] == 1
    assert sorted(plan.batch_ids) == sorted(r["id"] for r in batch_rows(engine))
    with engine.connect() as conn:
        states = {k: r["state"] for k, r in progress.counter_rows(conn).items()}
    assert set(states.values()) == {progress.BACKFILLING}


def test_one_update_per_batch_for_all_counters_writing_only_wrong_rows(engine: sa.Engine) -> None:
    seed(engine, users=200)
    wrong = {uid for uid, *_ in drift(engine)}
    plan = _plan(engine, USER_COUNTERS, batch_size=50)
    statements: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        statements.append(statement)

    outcomes = run_inline(engine, counters_by_key(), plan.batch_ids)
    # On PostgreSQL the recount is a data-modifying CTE of the run row's read.
    updates_of_users = [
        s for s in statements if re.match(r"\s*(WITH recount AS\s*\(\s*)?UPDATE users\b", s, re.I)
    ]
    assert len(updates_of_users) == len(plan.batch_ids) == 4
    assert sum(o.rows_changed for o in outcomes) == len(wrong)
    assert drift(engine) == []


def test_plan_is_committed_before_messages_and_messages_carry_only_the_batch_id(
    engine: sa.Engine,
) -> None:
    seed(engine, users=100)
    plan = _plan(engine, USER_COUNTERS)
    broker = StubBroker()
    seen_in_db = []

    original = broker.enqueue

    def enqueue(message, *, delay=None):  # noqa: ANN001, ANN202
        # Another connection sees the batch the message names: it was committed first.
        with sa.create_engine(engine.url).connect() as other:
            seen_in_db.append(
                other.execute(
                    sa.select(progress.batches_table.c.id).where(
                        progress.batches_table.c.id == message.args[0]
                    )
                ).scalar()
            )
        return original(message, delay=delay)

    broker.enqueue = enqueue  # type: ignore[method-assign]
    assert send_batches(broker, "cf", plan.batch_ids) == len(plan.batch_ids)
    messages = broker.queues["cf"]
    bodies = [messages.get_nowait() for _ in range(messages.qsize())]
    assert seen_in_db == plan.batch_ids
    for body, batch_id in zip(bodies, plan.batch_ids, strict=True):
        message = Message.decode(body)
        assert message.actor_name == BATCH_ACTOR
        assert message.args == (batch_id,) and message.kwargs == {}


def test_replanning_resumes_and_never_redoes_done_batches(engine: sa.Engine) -> None:
    seed(engine, users=250)
    counters = counters_by_key()
    first = _plan(engine, USER_COUNTERS)
    for batch_id in first.batch_ids[:2]:
        run_batch(engine, counters, batch_id)
    with engine.begin() as conn:
        chosen = planning.choose(conn, list(counters.values()), (), False)
        again = planning.plan(conn, chosen, 50)
    assert again.new_run_ids == [] and again.resumed_run_ids == first.run_ids
    assert again.batch_ids == first.batch_ids[2:]
    outcomes = run_inline(engine, counters, first.batch_ids)  # duplicates of done ones included
    assert [o.applied for o in outcomes] == [False, False] + [True] * (len(first.batch_ids) - 2)
    (run,) = run_rows(engine)
    assert run["state"] == progress.DONE and run["batches_done"] == run["batches_total"] == 5
    assert drift(engine) == []


def test_failed_batches_are_retried_by_the_next_enqueue(engine: sa.Engine) -> None:
    seed(engine, users=150)
    counters = counters_by_key()
    plan = _plan(engine, USER_COUNTERS)
    mark_failed(engine, plan.batch_ids[1], "OperationalError: boom")
    run_inline(engine, counters, [plan.batch_ids[0], plan.batch_ids[2]])
    (run,) = run_rows(engine)
    assert run["state"] == progress.FAILED and run["batches_failed"] == 1
    with engine.connect() as conn:
        (status,) = progress.statuses(conn, ["users.followers_count"])
    assert status.state == progress.FAILED and status.last_error == "OperationalError: boom"
    again = _plan(engine, USER_COUNTERS)
    assert again.resumed_run_ids == plan.run_ids and again.batch_ids == [plan.batch_ids[1]]
    (run,) = run_rows(engine)
    assert run["state"] == progress.RUNNING and run["batches_failed"] == 0
    run_inline(engine, counters, again.batch_ids)
    (run,) = run_rows(engine)
    assert run["state"] == progress.DONE and run["batches_done"] == 3
    with engine.connect() as conn:
        assert {r["state"] for r in progress.counter_rows(conn).values()} == {progress.ACTIVE}
    assert drift(engine) == []


def test_choose_pending_all_or_named(engine: sa.Engine) -> None:
    seed(engine, users=10)
    counters = list(counters_by_key().values())
    with engine.begin() as conn:
        for stmt in progress.unrequest_statements("users.likes_total"):
            conn.execute(stmt)  # never requested again: active
        pending = planning.choose(conn, counters, (), False)
        everything = planning.choose(conn, counters, (), True)
        named = planning.choose(conn, counters, ["users.likes_total"], False)
        with pytest.raises(UnknownCounterError, match="users.nope"):
            planning.choose(conn, counters, ["users.nope"], False)
        with pytest.raises(CounterfillError, match="not both"):
            planning.choose(conn, counters, ["users.likes_total"], True)
    assert sorted(c.key for c in pending) == sorted(set(USER_COUNTERS) - {"users.likes_total"})
    assert len(everything) == len(counters)
    assert [c.key for c in named] == ["users.likes_total"]


def test_empty_table_gets_one_open_batch_and_completes(engine: sa.Engine) -> None:
    seed(engine, users=0)
    plan = _plan(engine, USER_COUNTERS)
    assert len(plan.batch_ids) == 1
    (outcome,) = run_inline(engine, counters_by_key(), plan.batch_ids)
    assert outcome.run_finished
    with engine.connect() as conn:
        assert {r["state"] for r in progress.counter_rows(conn).values()} == {progress.ACTIVE}


def test_batch_size_must_be_positive(engine: sa.Engine) -> None:
    seed(engine, users=5)
    with pytest.raises(CounterfillError, match="at least 1"):
        _plan(engine, USER_COUNTERS, batch_size=0)
    assert run_rows(engine) == []


def test_status_rate_and_eta_come_from_the_recent_window(engine: sa.Engine) -> None:
    seed(engine, users=250)
    counters = counters_by_key()
    plan = _plan(engine, USER_COUNTERS)
    run_inline(engine, counters, plan.batch_ids[:3])
    now = progress.now()
    r = progress.runs_table
    with engine.begin() as conn:  # planned two hours ago; 50 parents in the last 10 s
        conn.execute(
            sa.update(r).values(
                created_at=now - dt.timedelta(hours=2),
                window_started_at=now - dt.timedelta(seconds=10),
                window_parents=50,
                last_batch_at=now - dt.timedelta(seconds=1),
            )
        )
        (status,) = progress.statuses(conn, ["users.posts_count"])
    assert status.batches_done == 3 and status.batches_total == 5
    assert status.parents_total == 250 and status.parents_done == 150
    assert status.rate is not None and 4 < status.rate < 6  # 50 parents in ~10 s
    assert status.eta_seconds is not None and 15 < status.eta_seconds < 25  # 100 left
    assert status.activity == "running"


def test_status_tells_a_stalled_run_from_a_running_one(engine: sa.Engine) -> None:
    seed(engine, users=250)
    plan = _plan(engine, USER_COUNTERS)
    run_inline(engine, counters_by_key(), plan.batch_ids[:1])
    now = progress.now()
    r = progress.runs_table
    with engine.begin() as conn:  # last batch 5 minutes ago, no worker heartbeat
        conn.execute(sa.update(r).values(last_batch_at=now - dt.timedelta(minutes=5)))
        (stalled,) = progress.statuses(conn, ["users.posts_count"])
    assert stalled.activity == "stalled" and stalled.workers_alive == 0
    heartbeat.beat(engine, "host:1", "counterfill")
    with engine.connect() as conn:
        (alive,) = progress.statuses(conn, ["users.posts_count"])
    assert alive.activity == "running" and alive.workers_alive == 1


def test_a_resume_racing_the_runs_last_batch_leaves_the_run_done(server_url: str) -> None:
    """``enqueue`` resumes a run whose last batch commits between its read and its resume.

    The planner read the run as running and that batch as not done; the batch
    then commits and marks the run done. Re-marking the run running would
    leave it so for ever (no batch left to end it, ``enqueue --wait`` polling
    until killed: seen once on MariaDB in `test_worker_control.py`).
    """
    engine = sa.create_engine(server_url)
    try:
        seed(engine, users=120)
        plan = _plan(engine, USER_COUNTERS)
        counters = counters_by_key()
        run_inline(engine, counters, plan.batch_ids[:-1])
        last = plan.batch_ids[-1]
        with engine.connect() as planner:
            done: list[object] = []

            def finish_the_run_first(conn, cursor, statement, *args) -> None:  # noqa: ANN001
                if statement.startswith("UPDATE counterfill_batches") and not done:
                    # Another connection: the last batch commits and marks the run done.
                    done.append(run_batch(engine, counters, last))

            sa.event.listen(planner, "before_cursor_execute", finish_the_run_first)
            with planner.begin():
                resumed = planning.plan(
                    planner, [counters[k] for k in USER_COUNTERS], 50, planning.Sizing()
                )
        assert resumed.resumed_run_ids == plan.run_ids
        (run,) = run_rows(engine)
        assert run["state"] == progress.RUN_DONE, dict(run)
        assert run["batches_done"] == run["batches_total"]
        with engine.connect() as conn:
            states = progress.counter_rows(conn)
        assert {states[k]["state"] for k in USER_COUNTERS} == {progress.ACTIVE}
        assert drift(engine) == []
    finally:
        engine.dispose()
