"""The backfill test models as an older deploy defined them: ``posts_count`` counted drafts.

Same tables as backfill_models; only ``users.posts_count``'s ``where=`` differs,
so a worker importing this module runs another definition of that counter.
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
    followers_count: Mapped[int] = counter_cache("Follow.followed_id")
    following_count: Mapped[int] = counter_cache("Follow.follower_id")
    posts_count: Mapped[int] = counter_cache(
        "Post.author_id", where=lambda: Post.published.is_(False)
    )
    likes_total: Mapped[int] = counter_cache("Post.author_id", sum="likes")


class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    published: Mapped[bool] = mapped_column(default=False)
    likes: Mapped[int] = mapped_column(default=0)
