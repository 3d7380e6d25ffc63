"""Completion notification: the transaction ending a run wakes `enqueue --wait` (PostgreSQL).

The mechanism is asserted (what was received, and that a wait was cut short
by it), never how long anything took.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from backfill_project import Project, drift, lock_users, run_rows, seed, wait_for

from alembic_counterfill import cli_backfill, notify, progress

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pg(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


def _announce(engine: sa.Engine, run_id: int, *, commit: bool) -> None:
    with engine.connect() as conn:
        notify.announce(conn, run_id)
        if commit:
            conn.commit()
        else:
            conn.rollback()


def test_a_listener_receives_the_end_of_a_run_at_commit_and_nothing_on_rollback(
    pg: sa.Engine,
) -> None:
    # Other sessions of the same database may announce their own runs: the
    # assertions look for this test's own (random) run ids only.
    rolled_back, committed = random.sample(range(10**9, 2 * 10**9), 2)
    with notify.Listener(pg) as listener:
        assert listener.listening
        _announce(pg, rolled_back, commit=False)
        _announce(pg, committed, commit=True)
        while str(committed) not in listener.received:
            assert listener.wait(60), "no notification within 60 s"
        assert str(rolled_back) not in listener.received
    assert not listener.listening  # UNLISTEN and the connection closed


def test_listener_falls_back_to_sleeping_without_notifications(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as conn:
            notify.announce(conn, 1)  # a no-op on SQLite, not an error
        with notify.Listener(engine) as listener:
            assert not listener.listening
            assert listener.wait(0) is False
            assert listener.received == []
    finally:
        engine.dispose()


class _SpyListener(notify.Listener):
    """The CLI's listener, recording itself and each wait cut short by a notification."""

    made: list[_SpyListener] = []

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.woken = 0
        _SpyListener.made.append(self)

    def wait(self, timeout: float) -> bool:
        woken = super().wait(timeout)
        self.woken += woken
        return woken


def test_enqueue_wait_is_woken_by_the_notification_of_a_real_worker(
    tmp_path: Path, pg_url: str, redis_url: str, pg: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(pg, users=400)
    monkeypatch.setattr(cli_backfill.notify, "Listener", _SpyListener)
    _SpyListener.made.clear()
    project = Project(tmp_path / "p", pg_url, broker_url=redis_url, batch_size=50)
    results: list[Any] = []
    waiting = threading.Thread(target=lambda: results.append(project.cli("enqueue", "--wait")))
    # The last range's batch cannot finish while user 400 is locked, so the run
    # ends only after `--wait` listens: its end must arrive as a notification.
    holder = lock_users(pg, [400])
    try:
        with project.worker():
            waiting.start()
            wait_for(lambda: any(x.listening for x in _SpyListener.made), what="--wait to listen")
            holder.rollback()
            waiting.join(timeout=120)
    finally:
        holder.rollback()
        holder.close()
        waiting.join(timeout=120)
    (result,) = results
    assert result.exit_code == 0, result.output
    (run,) = run_rows(pg)
    assert run["state"] == progress.DONE and run["batches_done"] == run["batches_total"] == 8
    assert drift(pg) == []  # judged against an independent COUNT
    (listener,) = _SpyListener.made
    # The worker's last batch announced the run's end, and a wait of the loop
    # was cut short by it (not ended by its timeout).
    assert str(run["id"]) in listener.received
    assert listener.woken >= 1
