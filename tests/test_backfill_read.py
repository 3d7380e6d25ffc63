"""The rollout read helper: live COUNT/SUM until the first backfill completes, cache after."""

from __future__ import annotations

from collections.abc import Iterator

import backfill_models as m
import pytest
import sqlalchemy as sa
from backfill_project import USER_COUNTERS, counters_by_key, seed
from sqlalchemy.orm import Session

from alembic_counterfill import definition, planning, progress, read
from alembic_counterfill.errors import UnknownCounterError
from alembic_counterfill.runner import run_inline


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    read.clear_cache()
    yield
    read.clear_cache()


def _truth(engine: sa.Engine, uid: int) -> tuple[int, int]:
    with engine.connect() as conn:
        followers = conn.execute(
            sa.text("SELECT count(*) FROM follows WHERE followed_id = :u"), {"u": uid}
        ).scalar_one()
        likes = conn.execute(
            sa.text("SELECT coalesce(sum(likes), 0) FROM posts WHERE author_id = :u"), {"u": uid}
        ).scalar_one()
    return followers, int(likes)


def _backfill(engine: sa.Engine, keys: list[str]) -> None:
    counters = counters_by_key()
    with engine.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in keys], 100)
    run_inline(engine, counters, plan.batch_ids)


def test_live_value_while_pending_cached_value_once_active(engine: sa.Engine) -> None:
    seed(engine, users=40)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET followers_count = 1000, likes_total = 1000"))
    with Session(engine) as session:
        user = session.get(m.User, 7)
        assert user is not None
        followers, likes = _truth(engine, 7)
        assert read.counter_value(session, user, "followers_count") == followers
        assert read.counter_value(session, user, "likes_total") == likes
        # Unflushed changes in the session count too (the live query autoflushes).
        session.add(m.Follow(follower_id=1, followed_id=7))
        assert read.counter_value(session, user, "followers_count") == followers + 1
        session.rollback()
    _backfill(engine, USER_COUNTERS)
    read.clear_cache()
    with engine.begin() as conn:  # make the cache distinguishable from the truth
        conn.execute(sa.text("UPDATE users SET followers_count = 4242 WHERE id = 7"))
    with Session(engine) as session:
        user = session.get(m.User, 7)
        assert read.counter_value(session, user, "followers_count") == 4242  # the cached column


def test_a_recount_of_an_active_counter_keeps_reading_the_cache(engine: sa.Engine) -> None:
    seed(engine, users=20)
    _backfill(engine, USER_COUNTERS)
    counters = counters_by_key()
    with engine.begin() as conn:  # --all: a recount run, counters backfilling again
        planning.plan(conn, [counters[k] for k in USER_COUNTERS], 100)
        conn.execute(sa.text("UPDATE users SET followers_count = 4242 WHERE id = 3"))
    read.clear_cache()
    with Session(engine) as session:
        user = session.get(m.User, 3)
        assert read.counter_value(session, user, "followers_count") == 4242


def test_unknown_counters_are_counted_live_until_recorded(engine: sa.Engine) -> None:
    m.Base.metadata.create_all(engine)  # no bookkeeping tables at all: every counter unknown
    with Session(engine) as session:
        session.add(m.User(id=1))
        session.commit()
        # A column never filled (e.g. the autogenerate plugin was missing): 5 is wrong.
        session.execute(sa.update(m.User).values(followers_count=5))
        # Counters are read-only to the ORM: a Core UPDATE sets one deliberately.
        session.execute(sa.update(m.User.__table__).values(followers_count=5))
        session.commit()
        user = session.get(m.User, 1)
        assert read.counter_value(session, user, "followers_count") == 0
        # Recorded active (what a clean `verify` does): the cache is trusted.
        counter = read.counter_of(sa.inspect(m.User), "followers_count")
        parts = definition.definition(counter)
        with engine.begin() as conn:
            progress.record_active(
                conn,
                [counter],
                {counter.key: (definition.fingerprint_of(parts), definition.encode(parts))},
            )
        read.clear_cache()
        assert read.counter_value(session, user, "followers_count") == 5


def test_unknown_attribute_is_named(engine: sa.Engine) -> None:
    m.Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(m.User(id=1))
        session.commit()
        user = session.get(m.User, 1)
        with pytest.raises(UnknownCounterError, match="User.name is not a counter_cache"):
            read.counter_value(session, user, "name")
