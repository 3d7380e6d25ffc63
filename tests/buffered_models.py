"""Models with buffered (hot-parent) counters next to an unbuffered one, for tests and workers.

Imported by the test process and, through ``[counterfill] metadata``, by real
``dramatiq alembic_counterfill.worker`` subprocesses (tests/ is on PYTHONPATH).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), default="")
    followers_count: Mapped[int] = counter_cache("Follow.followed_id", buffered=True)
    following_count: Mapped[int] = counter_cache("Follow.follower_id")
    posts_count: Mapped[int] = counter_cache(
        "Post.author_id", where=lambda: Post.published.is_(True), buffered=True
    )
    likes_total: Mapped[int] = counter_cache("Post.author_id", sum="likes", buffered=True)


class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"), index=True)
    published: Mapped[bool] = mapped_column(default=False)
    likes: Mapped[int] = mapped_column(default=0)


COLUMNS = ["followers_count", "following_count", "posts_count", "likes_total"]
BUFFERED = ["followers_count", "posts_count", "likes_total"]

#: The test's own truth, per user: (column, pending deltas, actual) for each counter.
TRUTH_SQL = sa.text(
    """
    SELECT u.id,
      u.followers_count,
      (SELECT coalesce(sum(d.followers_count), 0) FROM counterfill_deltas_users d
        WHERE d.parent_id = u.id),
      (SELECT count(*) FROM follows f WHERE f.followed_id = u.id),
      u.following_count, 0,
      (SELECT count(*) FROM follows f WHERE f.follower_id = u.id),
      u.posts_count,
      (SELECT coalesce(sum(d.posts_count), 0) FROM counterfill_deltas_users d
        WHERE d.parent_id = u.id),
      (SELECT count(*) FROM posts p WHERE p.author_id = u.id AND p.published),
      u.likes_total,
      (SELECT coalesce(sum(d.likes_total), 0) FROM counterfill_deltas_users d
        WHERE d.parent_id = u.id),
      (SELECT coalesce(sum(p.likes), 0) FROM posts p WHERE p.author_id = u.id)
    FROM users u ORDER BY u.id
    """
)


def rows(bind: sa.Engine | sa.Connection) -> list[tuple[int, str, int, int, int]]:
    """(id, column name, column value, pending deltas, actual) for every user and counter."""
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return rows(conn)
    out = []
    for row in bind.execute(TRUTH_SQL):
        for i, name in enumerate(COLUMNS):
            col, pend, actual = row[1 + 3 * i], row[2 + 3 * i], row[3 + 3 * i]
            out.append((row[0], name, int(col), int(pend), int(actual)))
    return out


def drift(bind: sa.Engine | sa.Connection) -> list[tuple[int, str, int, int]]:
    """(id, counter, column + pending, actual) wherever the exact value is wrong."""
    return [(u, n, c + p, a) for u, n, c, p, a in rows(bind) if c + p != a]


def column_drift(bind: sa.Engine | sa.Connection) -> list[tuple[int, str, int, int]]:
    """(id, counter, column, actual) wherever the column alone is wrong (fine before a fold)."""
    return [(u, n, c, a) for u, n, c, p, a in rows(bind) if c != a]


def pending_count(bind: sa.Engine) -> int:
    """Delta rows waiting for a fold."""
    with bind.connect() as conn:
        return int(conn.scalar(sa.text("SELECT count(*) FROM counterfill_deltas_users")) or 0)
