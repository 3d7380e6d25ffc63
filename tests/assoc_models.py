"""Models with plain association tables (``relationship(secondary=...)``) and their truth.

- ``followers``: self-referential, with a composite primary key, an
  ``accepted`` flag (counted by ``where=``) and a ``weight`` (``sum=``);
  ``User.following`` with ``backref="followers"`` (both sides of one table).
- ``post_tags``: no primary key at all, set collections on ``Post.tags`` and
  a list on ``Tag.posts`` (``back_populates``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


followers = sa.Table(
    "followers",
    Base.metadata,
    sa.Column("follower_id", sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("followed_id", sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("accepted", sa.Boolean, nullable=False, default=True),
    sa.Column("weight", sa.Integer, nullable=False, default=2),
)

post_tags = sa.Table(
    "post_tags",
    Base.metadata,
    sa.Column("post_id", sa.ForeignKey("posts.id"), nullable=False, index=True),
    sa.Column("tag_id", sa.ForeignKey("tags.id"), nullable=False, index=True),
)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), default="user")
    followers_count: Mapped[int] = counter_cache(lambda: followers.c.followed_id)
    following_count: Mapped[int] = counter_cache("followers.follower_id")
    accepted_followers: Mapped[int] = counter_cache(
        "followers.followed_id", where=lambda: followers.c.accepted.is_(True)
    )
    follower_weight: Mapped[int] = counter_cache("followers.followed_id", sum="weight")

    following: Mapped[list[User]] = relationship(
        secondary=followers,
        primaryjoin=lambda: followers.c.follower_id == User.id,
        secondaryjoin=lambda: followers.c.followed_id == User.id,
        backref="followers",
    )
    # Read-only view of the same rows: never writes, never counted.
    followed_view: Mapped[list[User]] = relationship(
        secondary=followers,
        primaryjoin=lambda: followers.c.follower_id == User.id,
        secondaryjoin=lambda: followers.c.followed_id == User.id,
        viewonly=True,
    )


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tags_count: Mapped[int] = counter_cache(lambda: post_tags.c.post_id)
    tags: Mapped[set[Tag]] = relationship(
        secondary=post_tags, collection_class=set, back_populates="posts"
    )


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    posts_count: Mapped[int] = counter_cache("post_tags.tag_id")
    posts: Mapped[list[Post]] = relationship(secondary=post_tags, back_populates="tags")


def _per(conn: sa.Connection, sql: str) -> dict[int, int]:
    return {k: int(v) for k, v in conn.execute(sa.text(sql))}


def truth(conn: sa.Connection) -> dict[tuple[str, int], tuple[int, ...]]:
    """Independent per-row truth, from GROUP BY queries written here in plain SQL."""
    fd = _per(conn, "SELECT followed_id, COUNT(*) FROM followers GROUP BY 1")
    fr = _per(conn, "SELECT follower_id, COUNT(*) FROM followers GROUP BY 1")
    acc = _per(conn, "SELECT followed_id, COUNT(*) FROM followers WHERE accepted GROUP BY 1")
    w = _per(conn, "SELECT followed_id, SUM(weight) FROM followers GROUP BY 1")
    pt = _per(conn, "SELECT post_id, COUNT(*) FROM post_tags GROUP BY 1")
    tp = _per(conn, "SELECT tag_id, COUNT(*) FROM post_tags GROUP BY 1")
    out: dict[tuple[str, int], tuple[int, ...]] = {}
    for (uid,) in conn.execute(sa.text("SELECT id FROM users")):
        out[("users", uid)] = (fd.get(uid, 0), fr.get(uid, 0), acc.get(uid, 0), w.get(uid, 0))
    for (pid,) in conn.execute(sa.text("SELECT id FROM posts")):
        out[("posts", pid)] = (pt.get(pid, 0),)
    for (tid,) in conn.execute(sa.text("SELECT id FROM tags")):
        out[("tags", tid)] = (tp.get(tid, 0),)
    return out


def cached(conn: sa.Connection) -> dict[tuple[str, int], tuple[int, ...]]:
    """The counter columns as stored."""
    out: dict[tuple[str, int], tuple[int, ...]] = {}
    q = (
        "SELECT id, followers_count, following_count, accepted_followers, follower_weight"
        " FROM users"
    )
    for row in conn.execute(sa.text(q)):
        out[("users", row[0])] = tuple(row[1:])
    for row in conn.execute(sa.text("SELECT id, tags_count FROM posts")):
        out[("posts", row[0])] = (row[1],)
    for row in conn.execute(sa.text("SELECT id, posts_count FROM tags")):
        out[("tags", row[0])] = (row[1],)
    return out


def assert_exact(engine: sa.Engine) -> None:
    """Every counter equals the independent truth."""
    with engine.connect() as conn:
        t, c = truth(conn), cached(conn)
    wrong = {k: (c[k], t[k]) for k in t if c[k] != t[k]}
    assert not wrong, f"drift (cached, truth): {wrong}"


def links(engine: sa.Engine) -> int:
    """How many rows both association tables hold (to check a test really wrote some)."""
    with engine.connect() as conn:
        a = conn.execute(sa.text("SELECT COUNT(*) FROM followers")).scalar_one()
        b = conn.execute(sa.text("SELECT COUNT(*) FROM post_tags")).scalar_one()
    return int(a) + int(b)
