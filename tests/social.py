"""Seed-shaped models used by the live-maintenance tests: users, follows, posts, referrals."""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from hypothesis.stateful import invariant
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alembic_counterfill import counter_cache
from alembic_counterfill.testing import CounterStateMachine


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), default="user")
    referrer_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"))
    followers_count: Mapped[int] = counter_cache("Follow.followed_id")
    following_count: Mapped[int] = counter_cache(lambda: Follow.follower_id)
    posts_count: Mapped[int] = counter_cache(
        "Post.author_id", where=lambda: Post.published.is_(True)
    )
    likes_total: Mapped[int] = counter_cache("Post.author_id", sum="likes")
    referrals_count: Mapped[int] = counter_cache("User.referrer_id")

    posts: Mapped[list[Post]] = relationship(back_populates="author")


class Follow(Base):
    __tablename__ = "follows"

    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"), index=True)
    published: Mapped[bool] = mapped_column(default=True)
    likes: Mapped[int] = mapped_column(default=0)
    title: Mapped[str] = mapped_column(sa.String(50), default="")

    author: Mapped[User | None] = relationship(back_populates="posts")


def truth(conn: sa.Connection) -> dict[int, tuple[int, int, int, int, int]]:
    """Independent per-user truth, computed with plain GROUP BY queries in the test's own SQL."""
    users = [r[0] for r in conn.execute(sa.text("SELECT id FROM users"))]
    # defaultdict: SQLite does not enforce FKs, so children may point at deleted users
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for u in users:
        out[u] = [0, 0, 0, 0, 0]
    for uid, n in conn.execute(sa.text("SELECT followed_id, COUNT(*) FROM follows GROUP BY 1")):
        out[uid][0] = n
    for uid, n in conn.execute(sa.text("SELECT follower_id, COUNT(*) FROM follows GROUP BY 1")):
        out[uid][1] = n
    q = "SELECT author_id, COUNT(*) FROM posts WHERE published GROUP BY 1"
    for uid, n in conn.execute(sa.text(q)):
        if uid is not None:
            out[uid][2] = n
    q = "SELECT author_id, COALESCE(SUM(likes), 0) FROM posts GROUP BY 1"
    for uid, n in conn.execute(sa.text(q)):
        if uid is not None:
            out[uid][3] = int(n)
    q = "SELECT referrer_id, COUNT(*) FROM users WHERE referrer_id IS NOT NULL GROUP BY 1"
    for uid, n in conn.execute(sa.text(q)):
        out[uid][4] = n
    return {k: tuple(v) for k, v in out.items() if k in set(users)}  # type: ignore[misc]


def cached(conn: sa.Connection) -> dict[int, tuple[int, int, int, int, int]]:
    """The counter columns as stored, per user."""
    q = (
        "SELECT id, followers_count, following_count, posts_count, likes_total, referrals_count"
        " FROM users"
    )
    return {r[0]: tuple(r[1:]) for r in conn.execute(sa.text(q))}  # type: ignore[misc]


def assert_exact(engine: sa.Engine) -> None:
    """Every user's counters equal the independent truth."""
    with engine.connect() as conn:
        t, c = truth(conn), cached(conn)
    wrong = {u: (c[u], t[u]) for u in t if c[u] != t[u]}
    assert not wrong, f"drift (cached, truth): {wrong}"


class SocialMachine(CounterStateMachine):
    """The library's state machine on these models, plus this module's independent truth."""

    base = Base
    url = ""

    def make_engine(self) -> sa.Engine:
        return sa.create_engine(self.url)

    def make_parent(self, cls: type) -> object:
        return cls(name="h")

    @invariant()
    def independent_truth(self) -> None:
        if not self.committed_state_readable():
            return
        assert_exact(self.engine)
