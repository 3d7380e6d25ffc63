"""Buffered counters on association tables with racing writers and folds (PostgreSQL, MariaDB).

Threads append and remove links of the same hot parents through ORM
collections (``User.following`` of ``followers``, ``Post.tags`` of the
keyless ``post_tags``) while two
folders fold in small chunks. Judged by the
test's own SQL (``buffered_assoc_models.state``: column, pending deltas and
COUNT/SUM, read in plain SQL): zero drift at the end, ``counter_value()``
equal to ``COUNT(*)`` in one REPEATABLE READ snapshot during the run, and
not one error: a deadlock (or a lock wait timeout) fails the test.

Lock waits are bounded (20 s) and threads are joined with a timeout, so a
deadlock the server does not detect fails the test instead of hanging it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from backfill_project import WriterThreads
from buffered_assoc_models import Base, Post, Tag, User, drift, pending, state
from conftest import is_deadlock
from sqlalchemy.orm import Session, selectinload

from alembic_counterfill import counter_value, counters_of
from alembic_counterfill import fold as folding

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_inline_folding")]

THREADS = 6
#: Followers per writer thread: each thread links only its own users (the
#: composite key of ``followers`` would otherwise turn races into duplicates).
OWN = 4
HOT = (1, 2)
HOT_TAGS = (1, 2)
POSTS_PER_THREAD = 3
JOIN_TIMEOUT = 120.0


def _bounded_lock_waits(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _set(dbapi_connection: Any, record: Any) -> None:
        cur = dbapi_connection.cursor()
        if engine.dialect.name == "postgresql":
            cur.execute("SET lock_timeout = '20s'")
        else:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 20")
        cur.close()
        if engine.dialect.name == "postgresql":
            dbapi_connection.commit()


@pytest.fixture
def eng(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url, pool_size=THREADS + 4)
    _bounded_lock_waits(engine)
    Base.metadata.create_all(engine)
    users = 2 + THREADS * OWN
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, users + 1)])
        s.add_all([Post(id=i) for i in range(1, THREADS * POSTS_PER_THREAD + 1)])
        s.add_all([Tag(id=i) for i in range(1, 5)])
        s.commit()
    yield engine
    engine.dispose()


class LinkWriters(WriterThreads):
    """``THREADS`` threads toggling links to the hot parents through ORM collections."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine, THREADS, join_timeout=JOIN_TIMEOUT)
        self.deadlocks = 0

    def _loop(self, index: int) -> None:
        rng = random.Random(index)
        mine = [3 + index * OWN + k for k in range(OWN)]
        posts = [1 + index * POSTS_PER_THREAD + k for k in range(POSTS_PER_THREAD)]
        while not self.stop.is_set():
            try:
                with Session(self.engine) as s:
                    self._one(s, rng, mine, posts)
                    s.commit()
                with self.lock:
                    self.writes += 1
            except Exception as exc:  # every error fails the test; deadlocks are counted
                with self.lock:
                    self.deadlocks += is_deadlock(exc)
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:3000])

    def _one(self, s: Session, rng: random.Random, mine: list[int], posts: list[int]) -> None:
        op = rng.randrange(4)
        if op < 2:  # follow or unfollow a hot user (both hot ones, now and then)
            me = s.scalars(
                sa.select(User)
                .where(User.id == rng.choice(mine))
                .options(selectinload(User.following))
            ).one()
            targets = [s.get(User, h) for h in HOT] if op == 1 else [s.get(User, rng.choice(HOT))]
            for target in targets:
                assert target is not None
                if target in me.following:
                    me.following.remove(target)
                else:
                    me.following.append(target)
        elif op == 2:  # tag or untag one of my posts with a hot tag
            post = s.scalars(
                sa.select(Post).where(Post.id == rng.choice(posts)).options(selectinload(Post.tags))
            ).one()
            tag = s.get(Tag, rng.choice(HOT_TAGS))
            assert tag is not None
            if tag in post.tags:
                post.tags.discard(tag)
            else:
                post.tags.add(tag)
        else:  # replace a whole collection
            me = s.scalars(
                sa.select(User)
                .where(User.id == rng.choice(mine))
                .options(selectinload(User.following))
            ).one()
            me.following = [u for u in (s.get(User, h) for h in HOT) if u and rng.random() < 0.5]


def _snapshot_wrong(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """counter_value() of the hot parents against COUNT(*)/SUM, in one REPEATABLE READ snapshot."""
    wrong: list[tuple[Any, ...]] = []
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=conn) as s:
            for uid in HOT:
                user = s.get(User, uid)
                truth = {
                    "followers_count": "SELECT count(*) FROM followers WHERE followed_id = :i",
                    "follower_weight": "SELECT coalesce(sum(weight), 0) FROM followers "
                    "WHERE followed_id = :i",
                }
                for name, q in truth.items():
                    actual = s.scalar(sa.text(q), {"i": uid})
                    got = counter_value(s, user, name)
                    if got != actual:
                        wrong.append(("users", uid, name, got, actual))
            for tid in HOT_TAGS:
                tag = s.get(Tag, tid)
                actual = s.scalar(
                    sa.text("SELECT count(*) FROM post_tags WHERE tag_id = :i"), {"i": tid}
                )
                got = counter_value(s, tag, "posts_count")
                if got != actual:
                    wrong.append(("tags", tid, "posts_count", got, actual))
            s.rollback()
    return wrong


def test_racing_link_writers_and_folds_leave_zero_drift(eng: sa.Engine) -> None:
    counters = counters_of(Base)
    stop = threading.Event()
    folded: list[int] = []
    fold_errors: list[str] = []

    def folder() -> None:
        while not stop.is_set():
            try:
                folded.append(folding.fold(eng, counters, chunk=3).deltas)
            except Exception as exc:  # a deadlock of a fold fails the test too
                fold_errors.append(f"{type(exc).__name__}: {exc}"[:300])
            stop.wait(0.01)

    folders = [threading.Thread(target=folder, daemon=True) for _ in range(2)]
    wrong: list[tuple[Any, ...]] = []
    try:
        with LinkWriters(eng) as writers:
            for t in folders:
                t.start()
            deadline = threading.Event()
            for _ in range(600):  # until 400 commits (or an error), at most 60 s
                if writers.writes >= 400 or writers.errors:
                    break
                deadline.wait(0.1)
                if _ % 20 == 0:
                    wrong.extend(_snapshot_wrong(eng))
    finally:
        stop.set()
        for t in folders:
            t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in folders), "a fold still running (deadlock?)"
    assert writers.deadlocks == 0, writers.errors[:5]
    assert writers.errors == [], writers.errors[:5]
    assert fold_errors == [], fold_errors[:5]
    assert writers.writes >= 400
    assert wrong == []
    assert sum(folded) > 0
    assert drift(eng) == {}
    folding.fold(eng, counters)
    assert pending(eng) == 0
    assert {k: v for k, v in state(eng).items() if v[0] != v[2]} == {}
    with eng.connect() as conn:  # the hot parents really were written
        assert conn.scalar(sa.text("SELECT count(*) FROM followers")) > 0


def test_uncommitted_link_writers_of_one_hot_parent_do_not_wait(eng: sa.Engine) -> None:
    """Two open transactions each link a follower to user 1: neither waits for the other.

    ``accepted_followers`` (``where=``) used to be recounted after a link
    INSERT, which locks the parent exclusively; its delta is now read back
    from the inserted rows, so writers of a hot parent share it.
    """
    first, second = Session(eng), Session(eng)
    try:
        for s, follower in ((first, 3), (second, 4)):
            conn = s.connection()
            # Bounded: a writer waiting for the other fails here instead of hanging.
            if eng.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            else:
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")
            me, hot = s.get(User, follower), s.get(User, 1)
            assert me is not None and hot is not None
            me.following.append(hot)
            s.flush()
        first.commit()
        second.commit()
    finally:
        first.close()
        second.close()
    assert drift(eng) == {}
    assert state(eng)[("users", 1, "accepted_followers")] == (0, 2, 2)
    folding.fold(eng, counters_of(Base))
    assert state(eng)[("users", 1, "accepted_followers")] == (2, 0, 2)


@pytest.mark.parametrize("owner", ["persistent", "new"])
def test_mariadb_link_writer_locks_its_parents_in_key_order(mariadb_url: str, owner: str) -> None:
    """A flush linking to users 2 then 1 never holds 2 while waiting for 1 (a fold's order).

    A fold locks its parents exclusively in key order. Here a third
    connection plays the fold: it holds user 1, the writer's flush is
    started, and once the writer waits, the "fold" asks for user 2. Had the
    link INSERT's foreign-key check taken user 2's shared lock first (the
    unit of work's order), that would be a deadlock; the writer locks the
    parents of its links up front, in key order, so it holds nothing yet.
    """
    from races import Racer, holding, race_engine, wait_blocked

    engine = race_engine(mariadb_url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i, name=f"u{i}") for i in range(1, 5)])
            s.commit()

        def write() -> None:
            with Session(engine) as s:
                s.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 20")
                if owner == "new":  # a user created in the same flush as its links
                    me = User(id=9, name="new")
                    s.add(me)
                else:
                    me = s.scalars(
                        sa.select(User).where(User.id == 3).options(selectinload(User.following))
                    ).one()
                me.following.extend([s.get(User, 2), s.get(User, 1)])
                s.commit()

        with holding(engine, "SELECT id FROM users WHERE id = 1 FOR UPDATE") as fold_conn:
            fold_conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 5")
            writer = Racer(write, "writer").start()
            wait_blocked(engine, 1, writer)
            # The fold's next parent: granted at once when the writer holds nothing on it.
            fold_conn.execute(sa.text("SELECT id FROM users WHERE id = 2 FOR UPDATE")).all()
        writer.join()
        assert drift(engine) == {}
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM followers")) == 2
    finally:
        engine.dispose()


def test_unlinking_from_a_hot_tag_of_a_keyless_table_waits_for_no_other_post(
    mariadb_url: str,
) -> None:
    """Post 2 leaves tag 1 while another transaction deletes post 1's link to tag 1 (MariaDB).

    ``post_tags`` has no primary key. Tag 1 has two links, post 2 has forty:
    left to choose, InnoDB reads ``post_id = 2 AND tag_id = 1`` through the
    ``tag_id`` index and waits for post 1's link, which is not ours; between
    writers of one hot tag such waits closed deadlock cycles. The library
    reaches the links through the ``post_id`` index, the locking read and the
    DELETE alike, and so never meets another post's link.
    """
    from races import Racer, holding, lock_waiters, race_engine, wait_until

    eng = race_engine(mariadb_url)
    try:
        Base.metadata.create_all(eng)
        with Session(eng) as s:
            tags = [Tag(id=i) for i in range(1, 41)]
            s.add_all(tags)
            s.add_all([Post(id=1, tags={tags[0]}), Post(id=2, tags=set(tags))])
            s.commit()
        with eng.connect() as conn:
            conn.exec_driver_sql("ANALYZE TABLE post_tags").all()

        def untag() -> None:
            with Session(eng) as s:
                post = s.scalars(
                    sa.select(Post).where(Post.id == 2).options(selectinload(Post.tags))
                ).one()
                post.tags.discard(next(t for t in post.tags if t.id == 1))
                s.commit()

        # Behind the library's back, through post 1's entries only, and rolled back.
        holder = (
            "DELETE post_tags FROM post_tags FORCE INDEX (ix_post_tags_post_id) "
            "WHERE post_id = 1 AND tag_id = 1"
        )
        with holding(eng, holder):
            racer = Racer(untag, "untag").start()
            wait_until(
                lambda: racer.done.is_set() or lock_waiters(eng) > 0, "the unlink to end or wait"
            )
            waited = not racer.done.is_set()
        racer.join()
        with eng.connect() as conn:
            links = conn.execute(
                sa.text("SELECT post_id, count(*) FROM post_tags GROUP BY post_id ORDER BY post_id")
            ).all()
        assert [tuple(r) for r in links] == [(1, 1), (2, 39)]
        assert drift(eng) == {}
        assert not waited, "the unlink of post 2 waited for post 1's link to tag 1"
    finally:
        eng.dispose()
