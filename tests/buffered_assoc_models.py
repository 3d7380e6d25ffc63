"""Buffered counters over association tables (``relationship(secondary=...)``), and their truth.

- ``followers``: self-referential, composite primary key; three buffered
  counters on ``followed_id`` (a count, a ``where=`` count, a ``sum=``) next to
  an unbuffered count on ``follower_id``;
- ``post_tags``: no primary key; buffered counts on both sides.
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
    followers_count: Mapped[int] = counter_cache(lambda: followers.c.followed_id, buffered=True)
    following_count: Mapped[int] = counter_cache("followers.follower_id")
    accepted_followers: Mapped[int] = counter_cache(
        "followers.followed_id", where=lambda: followers.c.accepted.is_(True), buffered=True
    )
    follower_weight: Mapped[int] = counter_cache(
        "followers.followed_id", sum="weight", buffered=True
    )

    following: Mapped[list[User]] = relationship(
        secondary=followers,
        primaryjoin=lambda: followers.c.follower_id == User.id,
        secondaryjoin=lambda: followers.c.followed_id == User.id,
        backref="followers",
    )


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tags_count: Mapped[int] = counter_cache(lambda: post_tags.c.post_id, buffered=True)
    tags: Mapped[set[Tag]] = relationship(
        secondary=post_tags, collection_class=set, back_populates="posts"
    )


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    posts_count: Mapped[int] = counter_cache("post_tags.tag_id", buffered=True)
    posts: Mapped[list[Post]] = relationship(secondary=post_tags, back_populates="tags")


#: Per parent table: (counter column, its deltas table or None, the truth's GROUP BY query).
COUNTERS = {
    "users": [
        (
            "followers_count",
            "counterfill_deltas_users",
            "SELECT followed_id, COUNT(*) FROM followers GROUP BY 1",
        ),
        ("following_count", None, "SELECT follower_id, COUNT(*) FROM followers GROUP BY 1"),
        (
            "accepted_followers",
            "counterfill_deltas_users",
            "SELECT followed_id, COUNT(*) FROM followers WHERE accepted GROUP BY 1",
        ),
        (
            "follower_weight",
            "counterfill_deltas_users",
            "SELECT followed_id, SUM(weight) FROM followers GROUP BY 1",
        ),
    ],
    "posts": [
        (
            "tags_count",
            "counterfill_deltas_posts",
            "SELECT post_id, COUNT(*) FROM post_tags GROUP BY 1",
        )
    ],
    "tags": [
        (
            "posts_count",
            "counterfill_deltas_tags",
            "SELECT tag_id, COUNT(*) FROM post_tags GROUP BY 1",
        )
    ],
}


def state(bind: sa.Engine) -> dict[tuple[str, int, str], tuple[int, int, int]]:
    """``(table, id, column) -> (column value, pending deltas, actual)``, all in plain SQL."""
    out = {}
    with bind.connect() as conn:
        for table, counters in COUNTERS.items():
            ids = [r[0] for r in conn.execute(sa.text(f"SELECT id FROM {table}"))]
            for column, deltas, truth_sql in counters:
                stored = dict(conn.execute(sa.text(f"SELECT id, {column} FROM {table}")).all())
                pending: dict[int, int] = {}
                if deltas is not None:
                    pending = dict(
                        conn.execute(
                            sa.text(
                                f"SELECT parent_id, SUM({column}) FROM {deltas} GROUP BY parent_id"
                            )
                        ).all()
                    )
                actual = dict(conn.execute(sa.text(truth_sql)).all())
                for i in ids:
                    out[(table, i, column)] = (
                        int(stored[i]),
                        int(pending.get(i, 0)),
                        int(actual.get(i, 0)),
                    )
    return out


def drift(bind: sa.Engine) -> dict[tuple[str, int, str], tuple[int, int]]:
    """Where column + pending deltas differs from the truth: ``key -> (cache, actual)``."""
    return {k: (c + p, a) for k, (c, p, a) in state(bind).items() if c + p != a}


def pending(bind: sa.Engine) -> int:
    """Delta rows waiting for a fold, over the three deltas tables."""
    with bind.connect() as conn:
        return sum(
            int(conn.scalar(sa.text(f"SELECT COUNT(*) FROM {t}")) or 0)
            for t in (
                "counterfill_deltas_users",
                "counterfill_deltas_posts",
                "counterfill_deltas_tags",
            )
        )
