"""Models for the backfill tests: seed-shaped users/follows/posts, and UUID-keyed orgs/members.

Imported by the test process and, through ``[counterfill] metadata``, by real
``dramatiq alembic_counterfill.worker`` subprocesses (tests/ is on PYTHONPATH).
"""

from __future__ import annotations

import uuid

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
        "Post.author_id", where=lambda: Post.published.is_(True)
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


class Org(Base):
    __tablename__ = "orgs"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    members_count: Mapped[int] = counter_cache("Member.org_id")


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("orgs.id"), index=True)
