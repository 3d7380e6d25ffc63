"""Live maintenance on SQLite and PostgreSQL: every ORM write keeps counters exact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User, assert_exact, cached
from sqlalchemy.orm import Session

from alembic_counterfill import paused


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        s.commit()
    yield engine


def counters(engine: sa.Engine, uid: int) -> tuple[int, ...]:
    with engine.connect() as conn:
        return cached(conn)[uid]


def test_insert_counts_and_sums(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=j) for j in (2, 3, 4)])
        s.add_all([Post(author_id=2, published=p, likes=k) for k, p in ((3, True), (4, False))])
        s.commit()
    assert counters(db, 1)[1] == 3
    assert counters(db, 2) == (1, 0, 1, 7, 0)
    assert_exact(db)


def test_delete_decrements(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Follow(follower_id=1, followed_id=2), Follow(follower_id=3, followed_id=2)])
        s.commit()
        s.delete(s.get(Follow, (1, 2)))
        s.commit()
    assert counters(db, 2)[0] == 1
    assert counters(db, 1)[1] == 0
    assert_exact(db)


@pytest.mark.parametrize(
    ("start", "end"), [(2, 3), (2, None), (None, 3)], ids=["A-to-B", "to-NULL", "from-NULL"]
)
def test_fk_move(db: sa.Engine, start: int | None, end: int | None) -> None:
    with Session(db) as s:
        s.add(Post(id=10, author_id=start, likes=5))
        s.commit()
        s.get(Post, 10).author_id = end  # type: ignore[union-attr]
        s.commit()
    for uid in (2, 3):
        expect = 1 if uid == end else 0
        assert counters(db, uid)[2] == expect
        assert counters(db, uid)[3] == 5 * expect
    assert_exact(db)


def test_where_flip_and_sum_change(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add(Post(id=1, author_id=4, published=False, likes=2))
        s.commit()
        post = s.get(Post, 1)
        assert post is not None
        post.published = True
        s.commit()
        assert counters(db, 4)[2:4] == (1, 2)
        post.likes = 40
        s.commit()
        assert counters(db, 4)[2:4] == (1, 40)
        post.published = False
        s.commit()
    assert counters(db, 4)[2:4] == (0, 40)
    assert_exact(db)


def test_self_referential_counter(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([User(id=10, referrer_id=1), User(id=11, referrer_id=1)])
        s.commit()
        s.get(User, 11).referrer_id = 2  # type: ignore[union-attr]
        s.commit()
    assert counters(db, 1)[4] == 1
    assert counters(db, 2)[4] == 1
    assert_exact(db)


def test_parent_and_children_in_one_flush(db: sa.Engine) -> None:
    with Session(db) as s:
        u = User(id=20)
        s.add(u)
        s.add_all([Post(author=u, likes=3), Post(author=u, likes=4, published=False)])
        s.commit()
        assert (u.posts_count, u.likes_total) == (1, 7)
    assert_exact(db)


def test_relationship_sync_moves_child(db: sa.Engine) -> None:
    # The FK is changed by the unit of work (relationship sync), not by the
    # application, so it is only visible during the flush.
    with Session(db) as s:
        p = Post(id=5, author_id=1, likes=2)
        s.add(p)
        s.commit()
        u2 = s.get(User, 2)
        assert u2 is not None
        u2.posts.append(p)
        s.commit()
        u1 = s.get(User, 1)
        assert u1 is not None
        u1.posts  # noqa: B018 - load the collection
        u2.posts.remove(p)  # FK set to NULL at flush
        s.commit()
    assert counters(db, 1)[2:4] == (0, 0)
    assert counters(db, 2)[2:4] == (0, 0)
    assert_exact(db)


def test_loaded_parents_see_fresh_values(db: sa.Engine) -> None:
    with Session(db) as s:
        u = s.get(User, 3)
        assert u is not None and u.followers_count == 0
        s.add(Follow(follower_id=1, followed_id=3))
        s.flush()
        assert u.followers_count == 1  # expired after the flush, reloaded
        u.name = "renamed"  # the parent's own flush must not write a stale counter
        s.add(Follow(follower_id=2, followed_id=3))
        s.commit()
    assert counters(db, 3)[0] == 2
    assert_exact(db)


def test_one_flush_of_many_children_coalesces(db: sa.Engine) -> None:
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement)

    with Session(db) as s:
        sa.event.listen(db, "before_cursor_execute", count)
        try:
            s.add_all([Post(author_id=1 + i % 5, likes=1) for i in range(1000)])
            s.flush()
        finally:
            sa.event.remove(db, "before_cursor_execute", count)
        s.commit()
    # Any UPDATE: on MariaDB/MySQL the one statement starts with its JSON_TABLE of deltas.
    updates = [x for x in statements if x.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1, updates  # one statement for all counters of all parents
    ours = [x for x in statements if not x.lstrip().upper().startswith("INSERT INTO POSTS")]
    assert len(ours) <= 4, ours  # re-read new state, (lock parents), one UPDATE
    assert counters(db, 1)[2:4] == (200, 200)
    assert_exact(db)


def test_rollback_leaves_no_trace(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add(Follow(follower_id=1, followed_id=2))
        s.flush()
        s.rollback()
        u = s.get(User, 2)
        assert u is not None and u.followers_count == 0
    assert counters(db, 2)[0] == 0
    # A flush that fails half-way (duplicate key) rolls back its deltas too.
    with Session(db) as s:
        s.add(Follow(follower_id=1, followed_id=2))
        s.commit()
    with Session(db) as s:
        s.add(Post(author_id=2))
        s.add(Follow(follower_id=1, followed_id=2))
        with pytest.raises(sa.exc.IntegrityError):
            s.commit()
        s.rollback()
    assert counters(db, 2)[0] == 1
    assert_exact(db)


def test_stale_and_expired_objects_use_database_state(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add(Post(id=1, author_id=1, likes=10))
        s.commit()
    a, b = Session(db), Session(db)
    pa, pb = a.get(Post, 1), b.get(Post, 1)
    assert pa is not None and pb is not None
    a.commit()
    b.commit()  # both objects are now expired
    pa.author_id = 2
    a.commit()
    pb.author_id = 3  # b's copy is expired: the old value must come from the row (2)
    b.commit()
    assert [counters(db, u)[2] for u in (1, 2, 3)] == [0, 0, 1]
    # Both delete the same row: the second delete must not decrement again.
    pa2, pb2 = a.get(Post, 1), b.get(Post, 1)
    a.delete(pa2)
    a.commit()
    b.delete(pb2)
    with pytest.warns(sa.exc.SAWarning):  # SQLAlchemy warns: 0 rows matched
        b.commit()
    a.close()
    b.close()
    assert [counters(db, u)[2] for u in (1, 2, 3)] == [0, 0, 0]
    assert_exact(db)


def test_paused_skips_deltas_and_is_documented_to_drift(db: sa.Engine) -> None:
    with Session(db) as s, paused():
        s.add(Follow(follower_id=1, followed_id=2))
        s.commit()
    assert counters(db, 2)[0] == 0  # paused: a backfill or verify --fix repairs it
    with Session(db) as s:
        s.add(Follow(follower_id=3, followed_id=2))
        s.commit()
    assert counters(db, 2)[0] == 1  # maintenance resumed after the block
