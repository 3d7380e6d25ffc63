"""Bulk statements on a buffered parent's children share the hot parent (PostgreSQL, MariaDB).

``insert(Child)``, ``update(Child)`` and ``delete(Child)`` through
``Session.execute`` append deltas for buffered counters, as a flush does. Two
open transactions each running one such statement for children of the same
hot parent must not wait for each other: the second one's lock wait is
bounded to 2 s, so a parent locked exclusively by the first fails the test
(lock wait timeout) instead of hanging it. Statements that must recount a
buffered counter (an INSERT of rows a ``where=`` counter counts, upserts,
``INSERT … SELECT``) still lock the parent exclusively; one such case is
checked to stay exact. Judged by buffered_models.TRUTH_SQL (COUNT/SUM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from buffered_models import Base, Follow, Post, User, column_drift, drift, pending_count
from sqlalchemy.orm import Session

from alembic_counterfill import counters_of
from alembic_counterfill import fold as folding

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_inline_folding")]


@pytest.fixture
def eng(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i) for i in range(1, 7)])
        s.commit()  # no relationship() orders users before their children
        s.add_all([Follow(id=i, follower_id=2 + i % 2, followed_id=1) for i in range(1, 5)])
        s.add_all(
            [Post(id=i, author_id=1, published=True, likes=i) for i in range(1, 5)]
            + [Post(id=10 + i, author_id=2 + i % 2, published=False) for i in range(1, 5)]
        )
        s.commit()
    yield engine
    engine.dispose()


def _bounded(s: Session) -> None:
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
    else:
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")


def _both_open(
    eng: sa.Engine, first: Callable[[Session], object], second: Callable[[Session], object]
) -> None:
    """Run ``first`` and ``second`` in two transactions open at once, then commit both."""
    a, b = Session(eng), Session(eng)
    try:
        _bounded(a)
        _bounded(b)
        first(a)
        second(b)  # a lock wait timeout here: the first holds the hot parent exclusively
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()


def _exact(eng: sa.Engine) -> None:
    assert drift(eng) == []
    folding.fold(eng, counters_of(Base))
    assert pending_count(eng) == 0
    assert column_drift(eng) == []


def test_bulk_inserts_of_followers_share_the_hot_parent(eng: sa.Engine) -> None:
    _both_open(
        eng,
        lambda s: s.execute(sa.insert(Follow), [{"id": 20, "follower_id": 4, "followed_id": 1}]),
        lambda s: s.execute(sa.insert(Follow), [{"id": 21, "follower_id": 5, "followed_id": 1}]),
    )
    _exact(eng)


def test_bulk_deletes_of_followers_share_the_hot_parent(eng: sa.Engine) -> None:
    _both_open(
        eng,
        lambda s: s.execute(sa.delete(Follow).where(Follow.id == 1)),
        lambda s: s.execute(sa.delete(Follow).where(Follow.id == 2)),
    )
    _exact(eng)


def test_bulk_updates_of_posts_share_the_hot_parent(eng: sa.Engine) -> None:
    _both_open(
        eng,
        lambda s: s.execute(sa.update(Post).where(Post.id == 1).values(likes=Post.likes + 5)),
        lambda s: s.execute(sa.update(Post).where(Post.id == 2).values(published=False)),
    )
    _exact(eng)


def test_bulk_updates_by_key_share_the_hot_parent(eng: sa.Engine) -> None:
    _both_open(
        eng,
        lambda s: s.execute(sa.update(Post), [{"id": 3, "likes": 30}]),
        lambda s: s.execute(sa.update(Post), [{"id": 4, "likes": 40}]),
    )
    _exact(eng)


def test_bulk_moves_onto_the_hot_parent_share_it(eng: sa.Engine) -> None:
    _both_open(
        eng,
        lambda s: s.execute(sa.update(Post).where(Post.id == 11).values(author_id=1)),
        lambda s: s.execute(sa.update(Post).where(Post.id == 12).values(author_id=1)),
    )
    _exact(eng)


def test_a_recounting_bulk_insert_stays_exact(eng: sa.Engine) -> None:
    """A where= counter's bulk INSERT recounts (parent locked exclusively): exact all the same."""
    with Session(eng) as s:
        s.execute(
            sa.insert(Post),
            [{"id": i, "author_id": 1, "published": True, "likes": 2} for i in (30, 31, 32)],
        )
        s.commit()
    _exact(eng)
    with Session(eng) as s:
        assert s.get(User, 1).posts_count == 7  # type: ignore[union-attr]
