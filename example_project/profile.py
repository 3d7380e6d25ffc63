"""Profile read comparison: the profile query with ``COUNT(*)`` versus the counter columns.

A profile page shows a user with their follower, following and published-post
counts. Without counter caches each read counts child rows; with them it reads
one row. Both queries are timed side by side for the user with the most
followers, and must return the same numbers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import ExampleError
from .models import Follow, Post, User


def count_query() -> sa.Select:
    """The profile read before counter caches: three ``COUNT(*)`` subqueries per page view."""
    followers = sa.select(sa.func.count()).where(Follow.followed_id == User.id)
    following = sa.select(sa.func.count()).where(Follow.follower_id == User.id)
    posts = sa.select(sa.func.count()).where(Post.author_id == User.id, Post.published.is_(True))
    return sa.select(
        User.id,
        User.username,
        followers.scalar_subquery().label("followers"),
        following.scalar_subquery().label("following"),
        posts.scalar_subquery().label("posts"),
    ).where(User.id == sa.bindparam("user_id"))


def counter_query() -> sa.Select:
    """The profile read with counter caches: one row, no child table touched."""
    return sa.select(
        User.id,
        User.username,
        User.followers_count.label("followers"),
        User.following_count.label("following"),
        User.posts_count.label("posts"),
    ).where(User.id == sa.bindparam("user_id"))


@dataclass
class Timing:
    """Median and spread of one query's repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    row: tuple[Any, ...]


@dataclass
class ProfileResult:
    """Both timings for one user, and how much faster the counter read is."""

    user_id: int
    repeat: int
    counts: Timing
    counters: Timing

    @property
    def speedup(self) -> float:
        """How many times faster the counter read is (median against median)."""
        return self.counts.median_ms / max(self.counters.median_ms, 1e-6)

    def report(self) -> str:
        """The side-by-side comparison, as printed by ``profile``."""
        _, username, followers, following, posts = self.counters.row
        return "\n".join(
            [
                f"profile of user {self.user_id} ({username}): {followers:,} followers, "
                f"{following:,} following, {posts:,} published posts",
                f"  COUNT(*) on follows/posts : {self.counts.median_ms:9.3f} ms  "
                f"(median of {self.repeat}, min {self.counts.min_ms:.3f}, "
                f"max {self.counts.max_ms:.3f})",
                f"  counter columns on users  : {self.counters.median_ms:9.3f} ms  "
                f"(median of {self.repeat}, min {self.counters.min_ms:.3f}, "
                f"max {self.counters.max_ms:.3f})",
                f"  speed-up                  : {self.speedup:9.1f}x",
            ]
        )


def most_followed(connection: Connection) -> int:
    """The id of the user with the most followers, counted from ``follows`` (not the cache)."""
    n = sa.func.count().label("n")
    row = connection.execute(
        sa.select(Follow.followed_id, n)
        .group_by(Follow.followed_id)
        .order_by(n.desc(), Follow.followed_id)
        .limit(1)
    ).first()
    if row is None:
        first = connection.execute(sa.select(sa.func.min(User.id))).scalar()
        if first is None:
            raise ExampleError(
                "no users to profile; load some first: python -m example_project seed --users 1000"
            )
        return int(first)
    return int(row[0])


def _time(connection: Connection, query: Any, user_id: int, repeat: int) -> Timing:
    # The first run fills SQLAlchemy's compiled cache and the database's page
    # cache; the timed runs then measure the database, not Python compilation.
    row = connection.execute(query, {"user_id": user_id}).one()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        connection.execute(query, {"user_id": user_id}).one()
        samples.append((time.perf_counter() - start) * 1000)
    return Timing(statistics.median(samples), min(samples), max(samples), tuple(row))


def compare(connection: Connection, user_id: int | None = None, repeat: int = 20) -> ProfileResult:
    """Time both profile queries for ``user_id`` (default: the most followed user).

    Raises :class:`ExampleError` if the counters disagree with ``COUNT(*)``.
    """
    if repeat < 1:
        raise ExampleError(f"--repeat must be at least 1, got {repeat}")
    try:
        uid = most_followed(connection) if user_id is None else user_id
        counts = _time(connection, count_query(), uid, repeat)
        counters = _time(connection, counter_query(), uid, repeat)
    except sa.exc.NoResultFound:
        raise ExampleError(f"no user with id {user_id}; pick an existing --user") from None
    except sa.exc.DBAPIError as exc:
        raise ExampleError(
            f"cannot run the profile queries ({type(exc.orig).__name__}); "
            "migrate to head first: alembic -c <alembic.ini> upgrade head"
        ) from None
    if counts.row != counters.row:
        raise ExampleError(
            f"user {uid}: counters {counters.row[2:]} differ from COUNT(*) {counts.row[2:]}; "
            "run: alembic counterfill verify --fix"
        )
    return ProfileResult(user_id=uid, repeat=repeat, counts=counts, counters=counters)
