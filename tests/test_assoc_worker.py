"""A backfill of association-table counters through a real ``dramatiq`` worker, writers racing it.

PostgreSQL and Redis; judged by an independent COUNT(*)/SUM (``assoc_models.truth``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from assoc_models import User, assert_exact, followers
from assoc_project import KEYS, assoc_project, seed_behind_the_listeners
from backfill_project import WriterThreads, wait_for
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from alembic_counterfill import progress

USERS = 1500


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url, pool_size=8)
    yield engine
    engine.dispose()


class Writers(WriterThreads):
    """Four threads following/unfollowing random users through collections and statements."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine, 4)

    def _loop(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            with Session(self.engine) as s:
                try:
                    a = s.get(User, rng.randrange(1, USERS))
                    b = s.get(User, rng.randrange(1, USERS))
                    assert a is not None and b is not None
                    if rng.random() < 0.2:
                        s.execute(sa.delete(followers).where(followers.c.followed_id == b.id))
                    elif b in a.following:
                        a.following.remove(b)
                    else:
                        a.following.append(b)
                    s.commit()
                    self.writes += 1
                except (sa.exc.IntegrityError, StaleDataError):
                    s.rollback()
                except Exception as exc:  # deadlocks included
                    self.errors.append(f"{type(exc).__name__}: {exc}")


def test_worker_backfills_association_counters_while_writers_race(
    tmp_path: Path, server_url: str, redis_url: str, pg: sa.Engine
) -> None:
    seed_behind_the_listeners(pg, users=USERS)
    project = assoc_project(tmp_path / "p", server_url, broker_url=redis_url)
    with project.worker() as worker, Writers(pg) as writers:
        wait_for(lambda: writers.writes >= 20 or writers.errors, what="writers to get going")
        before = writers.writes
        result = project.cli("enqueue", "--wait")
        during = writers.writes - before
    assert result.exit_code == 0, result.output
    assert writers.errors == []
    assert during > 0  # writers really raced the backfill
    assert_exact(pg)
    assert "deadlock" not in worker.log.lower()
    status = json.loads(project.cli("status", "--json").output)
    assert {s["counter"]: s["state"] for s in status} == {k: progress.ACTIVE for k in KEYS}
    assert all(s["batches_done"] == s["batches_total"] > 0 for s in status)
    users = [s for s in status if s["counter"].startswith("users.")]
    assert all(s["batches_total"] == USERS // 25 for s in users)  # batch_size 25
