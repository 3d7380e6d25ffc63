"""Eight threads of ORM traffic on a few hot parents: zero drift, zero deadlocks."""

from __future__ import annotations

import random
import threading

import sqlalchemy as sa
from conftest import is_deadlock
from social import Base, Follow, Post, User, assert_exact
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import ObjectDeletedError, StaleDataError

HOT = [1, 2, 3, 4, 5]
THREADS = 8
OPS = 120


def worker(engine: sa.Engine, seed: int, deadlocks: list[int], errors: list[BaseException]) -> None:
    rnd = random.Random(seed)
    for _ in range(OPS):
        # Half the threads keep stale in-memory copies after commit, half get expired ones.
        with Session(engine, expire_on_commit=seed % 2 == 0) as s:
            try:
                op = rnd.random()
                if op < 0.2:
                    a, b = rnd.sample(HOT, 2)
                    s.add(Follow(follower_id=a, followed_id=b))
                elif op < 0.3:
                    f = s.scalars(sa.select(Follow).limit(5)).all()
                    if f:
                        s.delete(rnd.choice(f))
                elif op < 0.45:
                    s.add(
                        Post(
                            author_id=rnd.choice(HOT + [None]),
                            published=rnd.random() < 0.5,
                            likes=rnd.randint(0, 9),
                        )
                    )
                else:
                    # Stale read: load posts, end the snapshot, let others write, then act.
                    posts = s.scalars(sa.select(Post).order_by(sa.func.random()).limit(3)).all()
                    s.commit()
                    if not posts:
                        continue
                    p = rnd.choice(posts)
                    r = rnd.random()
                    if r < 0.35:
                        p.author_id = rnd.choice(HOT + [None])
                    elif r < 0.6:
                        p.published = rnd.random() < 0.5
                    elif r < 0.8:
                        p.likes = rnd.randint(0, 20)
                    else:
                        s.delete(p)
                s.commit()
            except sa.exc.OperationalError as exc:
                s.rollback()
                if is_deadlock(exc):
                    deadlocks.append(1)
                else:
                    errors.append(exc)
            except (sa.exc.IntegrityError, StaleDataError, ObjectDeletedError):
                s.rollback()  # duplicate follow, or the row vanished under a stale update
            except sa.exc.SAWarning:
                s.rollback()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)


def test_concurrent_orm_traffic_keeps_counters_exact(server_url: str) -> None:
    import warnings

    # READ COMMITTED on InnoDB, as docs/databases.md recommends for concurrent writers.
    isolation = {"isolation_level": "READ COMMITTED"} if "mysql" in server_url else {}
    engine = sa.create_engine(server_url, pool_size=THREADS, max_overflow=2, **isolation)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i) for i in HOT])
        s.commit()
    deadlocks: list[int] = []
    errors: list[BaseException] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)  # "0 rows matched" on racing deletes
        threads = [
            threading.Thread(target=worker, args=(engine, i, deadlocks, errors))
            for i in range(THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert deadlocks == []
    with engine.connect() as conn:
        n_posts = conn.scalar(sa.text("SELECT count(*) FROM posts"))
        n_follows = conn.scalar(sa.text("SELECT count(*) FROM follows"))
    assert n_posts and n_follows  # the traffic really happened
    assert_exact(engine)
    engine.dispose()
