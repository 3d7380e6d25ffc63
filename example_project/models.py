"""Models of the example social app: ``User`` with three counter caches, ``Follow`` and ``Post``.

``posts_count`` counts published posts only (drafts do not show on a profile),
so publishing or unpublishing a post moves it.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    """Declarative base of the example app; ``[counterfill] metadata`` points here."""

    # Named constraints let migrations drop them by name, on SQLite batch mode too.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    """A member; profile pages read the three counters instead of counting children."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(40), unique=True)

    followers_count: Mapped[int] = counter_cache("Follow.followed_id")
    following_count: Mapped[int] = counter_cache("Follow.follower_id")
    posts_count: Mapped[int] = counter_cache(
        "Post.author_id", where=lambda: Post.published.is_(True)
    )

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"


class Follow(Base):
    """``follower`` follows ``followed``; the pair is the key, so a user follows another once."""

    __tablename__ = "follows"

    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    # The primary key's index serves follower_id; followers of a user need their own.
    followed_id: Mapped[int] = mapped_column(
        sa.ForeignKey("users.id"), primary_key=True, index=True
    )

    def __repr__(self) -> str:
        return f"<Follow {self.follower_id} -> {self.followed_id}>"


class Post(Base):
    """A post by ``author``; only published posts count towards ``User.posts_count``."""

    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    published: Mapped[bool] = mapped_column(default=False)

    def __repr__(self) -> str:
        return f"<Post {self.id} by {self.author_id}>"
