"""Buffered counters over association tables: collections, Core statements, folds, recounts.

SQLite, PostgreSQL and MariaDB. Judged by ``buffered_assoc_models.state``
(column, pending deltas and COUNT/SUM, each read in plain SQL by the test):
column + pending equals the truth after every commit, with folds in between
and deltas left pending; after a fold the column alone does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from buffered_assoc_models import Base, Post, Tag, User, drift, followers, pending, post_tags, state
from sqlalchemy.orm import Session, selectinload

from alembic_counterfill import counter_value, counters_of, planning, progress
from alembic_counterfill import fold as folding
from alembic_counterfill.batch import run_batch
from alembic_counterfill.verify import verify

pytestmark = pytest.mark.usefixtures("no_inline_folding")


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 7)])
        s.add_all([Post(id=i) for i in range(1, 4)])
        s.add_all([Tag(id=i) for i in range(1, 5)])
        s.commit()
    yield engine


def fold(engine: sa.Engine) -> int:
    return folding.fold(engine, counters_of(Base)).deltas


def exact(engine: sa.Engine) -> None:
    """column + pending == truth everywhere, and counter_value() says so too."""
    assert drift(engine) == {}
    with Session(engine) as s:
        for (table, pid, column), (_, _, actual) in state(engine).items():
            cls = {"users": User, "posts": Post, "tags": Tag}[table]
            assert counter_value(s, s.get(cls, pid), column) == actual, (table, pid, column)


def folded(engine: sa.Engine) -> None:
    """After a fold: nothing pending, and every column alone is the truth."""
    fold(engine)
    assert pending(engine) == 0
    assert {k: v for k, v in state(engine).items() if v[0] != v[2]} == {}


def users(s: Session, *ids: int) -> list[User]:
    stmt = sa.select(User).where(User.id.in_(ids))
    stmt = stmt.options(selectinload(User.following), selectinload(User.followers))
    by_id = {u.id: u for u in s.scalars(stmt)}
    return [by_id[i] for i in ids]


def test_collection_append_remove_clear_with_folds_between(db: sa.Engine) -> None:
    with Session(db) as s:
        a, b, c, d, e = users(s, 1, 2, 3, 4, 5)
        a.following.append(b)
        a.following.extend([c, d])
        e.following.append(b)
        s.commit()
        assert pending(db) > 0
        # The buffered column waits for a fold; the unbuffered one moved at once.
        (column, waiting, actual) = state(db)[("users", 2, "followers_count")]
        assert (column, waiting, actual) == (0, 2, 2)
        assert state(db)[("users", 1, "following_count")] == (3, 0, 3)
        exact(db)
        folded(db)
        a.following.remove(c)
        b.followers.append(c)  # the backref side
        s.commit()
        exact(db)  # pending again: -1 for user 3, +1 for user 2
        assert state(db)[("users", 2, "followers_count")] == (2, 1, 3)
        a.following = [c, e]  # b and d removed, c and e added
        s.commit()
        exact(db)
        a.following.clear()
        s.commit()
        exact(db)
        assert pending(db) > 0
        s.delete(b)  # its rows in followers go with it (both sides)
        s.commit()
        exact(db)
    folded(db)


def test_set_collections_on_a_table_without_primary_key(db: sa.Engine) -> None:
    with Session(db) as s:
        p1, p2 = s.get(Post, 1), s.get(Post, 2)
        t1, t2, t3 = s.get(Tag, 1), s.get(Tag, 2), s.get(Tag, 3)
        assert p1 and p2 and t1 and t2 and t3
        p1.tags |= {t1, t2, t3}
        t1.posts.append(p2)
        s.commit()
        exact(db)
        fold(db)
        p1.tags.discard(t2)
        p1.tags = {t3}
        s.commit()
        exact(db)
        assert state(db)[("tags", 1, "posts_count")][2] == 1
    folded(db)


def test_core_statements_on_the_link_table(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(followers), [{"follower_id": 1, "followed_id": j} for j in (2, 3, 4)])
        s.execute(
            sa.insert(followers),
            [{"follower_id": 5, "followed_id": 2, "accepted": False, "weight": 7}],
        )
        s.commit()
        exact(db)
        assert state(db)[("users", 2, "follower_weight")] == (0, 9, 9)  # pending
        fold(db)
        s.execute(sa.insert(followers).values(follower_id=6, followed_id=3))
        s.execute(
            sa.insert(followers).values(
                [{"follower_id": 6, "followed_id": 4}, {"follower_id": 6, "followed_id": 5}]
            )
        )
        s.commit()
        exact(db)  # pending on top of folded columns
        s.execute(sa.update(followers).where(followers.c.follower_id == 1).values(accepted=False))
        s.commit()
        exact(db)
        s.execute(
            sa.update(followers)
            .where(followers.c.follower_id == 6, followers.c.followed_id == 5)
            .values(followed_id=2, weight=1)
        )
        s.commit()
        exact(db)
        fold(db)
        s.execute(sa.delete(followers).where(followers.c.followed_id == 2))
        s.commit()
        exact(db)
        assert state(db)[("users", 2, "followers_count")][2] == 0
        s.execute(
            sa.insert(post_tags).from_select(
                ["post_id", "tag_id"], sa.select(Post.id, sa.literal(3)).where(Post.id < 3)
            )
        )
        s.commit()
        exact(db)
        s.execute(sa.delete(post_tags).where(post_tags.c.post_id == 1))  # no primary key
        s.commit()
        exact(db)
    folded(db)


def test_a_rolled_back_statement_leaves_no_delta(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(followers), [{"follower_id": 1, "followed_id": 2}])
        a, b = users(s, 3, 2)
        a.following.append(b)
        s.flush()
        s.rollback()
    assert pending(db) == 0
    exact(db)


def _links_behind_the_listeners(engine: sa.Engine) -> None:
    """Rows the library cannot see (a bare Connection), plus pending deltas it did see."""
    with engine.begin() as conn:
        conn.execute(
            sa.insert(followers),
            [{"follower_id": i, "followed_id": j} for i in range(1, 7) for j in (1, 2) if i != j],
        )
        conn.execute(sa.insert(post_tags), [{"post_id": p, "tag_id": 1} for p in (1, 2, 3)])
    with Session(engine) as s:
        a, b = users(s, 3, 4)
        a.following.append(b)
        post, tag = s.get(Post, 2), s.get(Tag, 2)
        assert post is not None and tag is not None
        post.tags.add(tag)
        s.commit()
    assert pending(engine) > 0 and drift(engine) != {}


def test_verify_fix_recounts_and_removes_the_pending_deltas(db: sa.Engine) -> None:
    _links_behind_the_listeners(db)
    found = verify(db, counters_of(Base))
    assert {(f.table, f.id, f.column) for f in found} >= {
        ("users", 1, "followers_count"),
        ("tags", 1, "posts_count"),
    }
    verify(db, counters_of(Base), fix=True)
    exact(db)
    assert verify(db, counters_of(Base)) == []
    folded(db)


def test_backfill_batches_recount_and_remove_the_range_deltas(db: sa.Engine) -> None:
    _links_behind_the_listeners(db)
    counters = {c.key: c for c in counters_of(Base)}
    with db.begin() as conn:
        progress.ensure_tables(conn)
        plan = planning.plan(conn, list(counters.values()), 2)
    for batch_id in plan.batch_ids:
        assert run_batch(db, counters, batch_id).applied
    exact(db)
    assert pending(db) == 0  # every parent was in some batch's range: its deltas went
    assert {k: v for k, v in state(db).items() if v[0] != v[2]} == {}
