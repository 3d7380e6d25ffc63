"""Buffered counters under concurrency (PostgreSQL, MariaDB): folds, backfills, workers vs writers.

Zero drift is judged with the test's own SQL (buffered_models.TRUTH_SQL), and
reads at random moments are checked in one REPEATABLE READ snapshot.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from backfill_project import BIN, Project, WriterThreads, is_mariadb, terminate, wait_for
from buffered_models import Base, Follow, Post, User, column_drift, drift, pending_count
from races import innodb_waiters
from sqlalchemy.orm import Session

from alembic_counterfill import counter_value, counters_of
from alembic_counterfill import fold as folding

pytestmark = pytest.mark.usefixtures("no_inline_folding")

USERS = 30


def _seeded(url: str) -> sa.Engine:
    engine = sa.create_engine(url, pool_size=12)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i) for i in range(1, USERS + 1)])
        s.commit()
    return engine


@pytest.fixture
def pg(pg_url: str) -> Iterator[sa.Engine]:
    engine = _seeded(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def server_db(server_url: str) -> Iterator[sa.Engine]:
    """PostgreSQL and MariaDB, seeded."""
    engine = _seeded(server_url)
    yield engine
    engine.dispose()


class Writers(WriterThreads):
    """Threads of ORM writes concentrated on two hot parents: follows, posts, moves, flips."""

    def __init__(self, engine: sa.Engine, threads: int = 6) -> None:
        super().__init__(engine, threads)

    def _loop(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            try:
                with Session(self.engine) as s:
                    self._one(s, rng, index)
                    s.commit()
                with self.lock:
                    self.writes += 1
            except Exception as exc:  # every error fails the test
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _one(self, s: Session, rng: random.Random, index: int) -> None:
        hot = rng.choice([1, 2, rng.randrange(1, USERS + 1)])
        other = rng.randrange(1, USERS + 1)
        op = rng.randrange(5)
        mine = (Post.id % len(self.threads)) == index
        if op == 0:
            s.add(Follow(follower_id=other, followed_id=hot))
        elif op == 1:
            follow = s.scalars(
                sa.select(Follow).where(Follow.id % len(self.threads) == index).limit(1)
            ).first()
            if follow is not None:
                s.delete(follow)
        elif op == 2:
            s.add(Post(author_id=hot, published=rng.random() < 0.5, likes=rng.randrange(9)))
        elif op == 3:
            s.execute(
                sa.update(Post)
                .where(mine, Post.author_id == hot)
                .values(published=sa.not_(Post.published))
            )
        else:
            post = s.scalars(sa.select(Post).where(mine).limit(1)).first()
            if post is not None:
                post.author_id = other
                post.likes = rng.randrange(20)


def snapshot_check(engine: sa.Engine) -> list[tuple[int, str, int, int]]:
    """counter_value() against COUNT/SUM for the hot parents, in one REPEATABLE READ snapshot."""
    wrong = []
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=conn) as s:
            for uid in (1, 2):
                user = s.get(User, uid)
                truth = {
                    "followers_count": s.scalar(
                        sa.text("SELECT count(*) FROM follows WHERE followed_id = :u"), {"u": uid}
                    ),
                    "posts_count": s.scalar(
                        sa.text("SELECT count(*) FROM posts WHERE author_id = :u AND published"),
                        {"u": uid},
                    ),
                    "likes_total": s.scalar(
                        sa.text("SELECT coalesce(sum(likes), 0) FROM posts WHERE author_id = :u"),
                        {"u": uid},
                    ),
                }
                for name, actual in truth.items():
                    got = counter_value(s, user, name)
                    if got != actual:
                        wrong.append((uid, name, got, actual))
            s.rollback()
    return wrong


def test_folds_racing_writers_leave_zero_drift(server_db: sa.Engine) -> None:
    pg = server_db
    counters = counters_of(Base)
    folded = []
    wrong: list[object] = []
    stop = threading.Event()

    def folder() -> None:
        while not stop.is_set():
            folded.append(folding.fold(pg, counters, chunk=7).deltas)
            stop.wait(0.01)

    folders = [threading.Thread(target=folder) for _ in range(2)]  # two folds race each other too
    with Writers(pg) as writers:
        for t in folders:
            t.start()
        wait_for(lambda: writers.writes >= 300 or writers.errors, what="writes")
        for _ in range(15):
            wrong.extend(snapshot_check(pg))
    stop.set()
    for t in folders:
        t.join()
    assert writers.errors == []
    assert wrong == []
    assert sum(folded) > 0
    assert drift(pg) == []
    folding.fold(pg, counters)
    assert pending_count(pg) == 0
    assert column_drift(pg) == []


def test_a_killed_fold_loses_and_repeats_nothing(server_db: sa.Engine, tmp_path: Path) -> None:
    """PostgreSQL and MariaDB: a fold killed mid-transaction, or while it waits, changes nothing."""
    db = server_db
    mariadb = is_mariadb(db)
    with Session(db) as s:
        for _ in range(5):
            s.add_all([Follow(follower_id=3, followed_id=1), Post(author_id=2, published=True)])
            s.commit()
    before = pending_count(db)
    assert before == 10
    # 1. Killed mid-transaction, after its reads, UPDATE and DELETE ran: the server rolls it back.
    conn = db.connect()
    try:
        if mariadb:  # as fold_on sets it
            conn.execution_options(isolation_level="READ COMMITTED")
        own_id = "connection_id()" if mariadb else "pg_backend_pid()"
        pid = conn.execute(sa.text(f"SELECT {own_id}")).scalar_one()
        moved = folding.fold_chunk(conn, User.__table__, 100)  # type: ignore[arg-type]
        assert moved.deltas == before
        terminate(db, pid)  # KILL on MariaDB, pg_terminate_backend on PostgreSQL
        with pytest.raises(sa.exc.DBAPIError):
            conn.commit()
    finally:
        conn.invalidate()
        conn.close()
    assert pending_count(db) == before
    assert drift(db) == []
    # 2. A `fold` process SIGKILLed while it waits for the parents' lock.
    url = db.url.render_as_string(hide_password=False)
    project = Project(tmp_path / "p", url)
    ini = Path(project.ini)
    ini.write_text(ini.read_text().replace("backfill_models:Base", "buffered_models:Base"))
    holder = db.connect()
    # Its own application_name: other tests share this server and its locks.
    # (MariaDB: innodb_waiters sees only this test's own database.)
    app = f"cf_fold_{uuid.uuid4().hex[:8]}"
    waiting: list[int] = []
    try:
        holder.execute(sa.text("SELECT id FROM users WHERE id = 2 FOR UPDATE"))
        proc = subprocess.Popen(
            [str(BIN / "alembic-counterfill"), "-c", project.ini, "fold"],
            env={**project.env(), "PGAPPNAME": app},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            waiting = wait_for(
                lambda: _waiting_folds(db, holder, app), what="the fold to wait for the lock"
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    # The killed session's transaction is rolled back once the server notices.
    wait_for(lambda: not _sessions_alive(db, app, waiting), what="the killed fold's session to go")
    assert pending_count(db) == before
    assert drift(db) == []
    result = project.cli("fold")
    assert result.exit_code == 0, result.output
    assert pending_count(db) == 0
    assert drift(db) == [] and column_drift(db) == []
    with Session(db) as s:
        assert s.get(User, 1).followers_count == 5  # type: ignore[union-attr]
        assert s.get(User, 2).posts_count == 5  # type: ignore[union-attr]


def _waiting_folds(engine: sa.Engine, holder: sa.Connection, app: str) -> list[int]:
    """Sessions of the fold process waiting for a lock (PostgreSQL: by application name)."""
    if is_mariadb(engine):
        with engine.connect() as conn:
            me = conn.execute(sa.text("SELECT connection_id()")).scalar_one()
            mine = holder.execute(sa.text("SELECT connection_id()")).scalar_one()
            return [x for x in innodb_waiters(conn) if x not in (me, mine)]
    return [1] * _backends(engine, app, waiting=True)


def _sessions_alive(engine: sa.Engine, app: str, ids: list[int]) -> int:
    """Sessions of the killed fold that the server still has."""
    if not is_mariadb(engine):
        return _backends(engine, app)
    stmt = sa.text("SELECT count(*) FROM information_schema.processlist WHERE id IN :ids")
    stmt = stmt.bindparams(sa.bindparam("ids", expanding=True))
    with engine.connect() as conn:
        return int(conn.scalar(stmt, {"ids": ids}) or 0)


def _backends(engine: sa.Engine, app: str, *, waiting: bool = False) -> int:
    """Backends of application ``app`` (only those waiting on a lock, with ``waiting``)."""
    cond = " AND wait_event_type = 'Lock'" if waiting else ""
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = :a{cond}"),
                {"a": app},
            )
            or 0
        )


def test_real_workers_fold_and_backfill_racing_writers_leave_zero_drift(
    server_db: sa.Engine, redis_url: str, tmp_path: Path
) -> None:
    pg = server_db
    url = pg.url.render_as_string(hide_password=False)
    project = Project(tmp_path / "p", url, broker_url=redis_url, batch_size=4)
    ini = Path(project.ini)
    ini.write_text(ini.read_text().replace("backfill_models:Base", "buffered_models:Base"))
    with (
        project.worker(processes=1, threads=2, COUNTERFILL_FOLD_INTERVAL="100") as worker,
        Writers(pg) as writers,
    ):
        wait_for(lambda: writers.writes >= 100 or writers.errors, what="writes")
        # The worker's ticker sends folds: the columns catch up without anyone asking.
        wait_for(lambda: _column_total(pg) > 0, what="a worker fold")
        result = project.cli("enqueue", "--all", "--wait")
        assert result.exit_code == 0, result.output
        wrong = [w for _ in range(10) for w in snapshot_check(pg)]
        writes_during = writers.writes
    assert writers.errors == []
    assert wrong == []
    assert writes_during > 100
    assert drift(pg) == []
    with project.worker(processes=1, threads=1, COUNTERFILL_FOLD_INTERVAL="100"):
        wait_for(lambda: pending_count(pg) == 0, what="the worker to fold what is left")
    assert column_drift(pg) == []
    assert "Traceback" not in worker.log, worker.log[-3000:]
    status = {s["counter"]: s for s in json.loads(project.cli("status", "--json").output)}
    assert status["users.followers_count"]["pending_deltas"] == 0


def _column_total(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT sum(followers_count) FROM users")) or 0)
