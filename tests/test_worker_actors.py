"""Actors declared on an app's own broker (one call), retries, failure marking, engine lifecycle."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import dramatiq
import pytest
import sqlalchemy as sa
from backfill_project import (
    USER_COUNTERS,
    batch_rows,
    counters_by_key,
    drift,
    make_read_only,
    run_rows,
    seed,
)
from dramatiq.brokers.stub import StubBroker

from alembic_counterfill import planning, progress
from alembic_counterfill.actors import BATCH_ACTOR, declare_actors
from alembic_counterfill.config import Settings


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url)
    yield engine
    engine.dispose()


def _settings(url: str) -> Settings:
    return Settings(
        metadata_path="backfill_models:Base",
        database_url=url,
        broker_url=None,
        queue=f"cf_{uuid.uuid4().hex[:8]}",
    )


def _plan(engine: sa.Engine) -> planning.BackfillPlan:
    counters = counters_by_key()
    with engine.begin() as conn:
        return planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)


def _work(broker: StubBroker, queue: str) -> None:
    """Run a Dramatiq worker on ``broker`` until the queue is drained, then stop it."""
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        broker.join(queue, fail_fast=False, timeout=60_000)  # failures are asserted on
        worker.join()
    finally:
        worker.stop()


def test_importing_the_library_binds_no_actor_to_any_broker() -> None:
    code = (
        "import alembic_counterfill, alembic_counterfill.actors, alembic_counterfill.cli\n"
        "import dramatiq.broker as b\n"
        "assert b.global_broker is None, b.global_broker\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_call_declares_the_actor_on_an_apps_broker(server_url: str, pg: sa.Engine) -> None:
    seed(pg, users=260)
    broker = StubBroker()
    settings = _settings(server_url)
    actors = declare_actors(broker, settings)
    assert broker.get_actor(BATCH_ACTOR).queue_name == settings.queue
    plan = _plan(pg)
    assert actors.send(plan.batch_ids) == len(plan.batch_ids)
    _work(broker, settings.queue)
    assert drift(pg) == []
    (run,) = run_rows(pg)
    assert run["state"] == progress.DONE and run["batches_done"] == len(plan.batch_ids)
    assert actors.source._engine is None  # disposed at worker shutdown


def test_a_batch_out_of_retries_is_marked_failed_with_its_error(
    server_url: str, pg: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    seed(pg, users=120)
    make_read_only(pg, 60)
    broker = StubBroker()
    settings = _settings(server_url)
    actors = declare_actors(broker, settings, max_retries=2, min_backoff=10, max_backoff=50)
    plan = _plan(pg)
    actors.send(plan.batch_ids)
    _work(broker, settings.queue)
    retried = [r for r in caplog.records if "will retry" in r.getMessage()]
    assert len(retried) == 2  # max_retries=2, with backoff, then marked failed
    failed = [b for b in batch_rows(pg) if b["state"] == progress.FAILED]
    assert [b["id"] for b in failed] == [plan.batch_ids[1]]  # [51, 101)
    prefix = "RaiseException" if pg.dialect.name == "postgresql" else "OperationalError"
    assert failed[0]["error"].startswith(f"{prefix}: user 60 is read-only")
    (run,) = run_rows(pg)
    assert run["state"] == progress.FAILED and run["batches_failed"] == 1
    with pg.connect() as conn:
        assert {r["state"] for r in progress.counter_rows(conn).values()} == {progress.FAILED}
    assert [(uid, col) for uid, col, *_ in drift(pg) if not 51 <= uid < 101] == []
