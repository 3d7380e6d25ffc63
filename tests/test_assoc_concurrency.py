"""Eight threads following and unfollowing the same few people (PostgreSQL, MariaDB).

Zero drift (independent COUNT(*)) and zero deadlocks. The MariaDB writers run
at READ COMMITTED, as in the other concurrency tests (docs/databases.md). A duplicate follow
(unique violation) or a stale double unfollow (StaleDataError) are the
expected losers of a race and are rolled back; any other error fails.
"""

from __future__ import annotations

import random
import threading
from collections import Counter as Tally
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from assoc_models import Base, User, assert_exact, followers
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

PEOPLE = 4
THREADS = 8
OPS = 60


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    isolation = {"isolation_level": "READ COMMITTED"} if "mysql" in server_url else {}
    engine = sa.create_engine(server_url, pool_size=THREADS + 2, **isolation)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, PEOPLE + 1)])
        s.commit()
    yield engine
    engine.dispose()


def _one(session: Session, rng: random.Random) -> str:
    a_id, b_id = rng.randrange(1, PEOPLE + 1), rng.randrange(1, PEOPLE + 1)
    op = rng.randrange(5)
    if op == 4:  # a statement through the session instead of a collection
        if rng.random() < 0.5:
            session.execute(
                sa.delete(followers).where(
                    followers.c.follower_id == a_id, followers.c.followed_id == b_id
                )
            )
            return "stmt-unfollow"
        session.execute(sa.insert(followers), [{"follower_id": a_id, "followed_id": b_id}])
        return "stmt-follow"
    load = rng.random() < 0.5
    stmt = sa.select(User).where(User.id == a_id)
    if load:
        stmt = stmt.options(selectinload(User.following))
    a = session.scalars(stmt).one()
    b = session.get(User, b_id)
    assert b is not None
    # Either side of the same rows; membership is checked on the side that changes.
    collection, other = (b.followers, a) if op % 2 else (a.following, b)
    if other in collection:
        collection.remove(other)
        return "unfollow"
    collection.append(other)
    return "follow"


def test_eight_threads_follow_and_unfollow_the_same_people(pg: sa.Engine) -> None:
    outcomes: Tally[str] = Tally()
    errors: list[str] = []
    lock = threading.Lock()

    def loop(index: int) -> None:
        rng = random.Random(index)
        for _ in range(OPS):
            with Session(pg) as session:
                try:
                    what = _one(session, rng)
                    session.commit()
                except (sa.exc.IntegrityError, StaleDataError) as exc:
                    session.rollback()
                    what = type(exc).__name__
                except Exception as exc:  # deadlocks included: every other error fails
                    session.rollback()
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
            with lock:
                outcomes[what] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert errors == []
    assert outcomes["follow"] > 0 and outcomes["unfollow"] > 0, outcomes
    assert outcomes["stmt-follow"] > 0 and outcomes["stmt-unfollow"] > 0, outcomes
    assert sum(outcomes.values()) == THREADS * OPS
    assert_exact(pg)
