"""Buffered counters through AsyncSession: asyncpg, psycopg's async driver, aiosqlite, aiomysql.

Writes (flush and bulk statements) append deltas; ``counter_value()`` is read
through ``AsyncSession.run_sync``; the embedded mode's inline fold runs as a
task of the app's event loop. Judged by buffered_models' plain-SQL truth.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from buffered_models import Base, Follow, Post, User, column_drift, drift, pending_count
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from test_async_sessions import _async_engine

from alembic_counterfill import counter_value
from alembic_counterfill.folding import configure_folding

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_inline_folding")]

PENDING = sa.text("SELECT count(*) FROM counterfill_deltas_users")


async def _truth(s: AsyncSession, uid: int) -> dict[str, int]:
    """The test's own COUNT/SUM for user ``uid``, read through the async session."""
    follows = "SELECT count(*) FROM follows WHERE followed_id = :u"
    posts = "SELECT count(*) FROM posts WHERE author_id = :u AND published"
    likes = "SELECT coalesce(sum(likes), 0) FROM posts WHERE author_id = :u"
    return {
        name: int((await s.execute(sa.text(q), {"u": uid})).scalar_one())
        for name, q in (
            ("followers_count", follows),
            ("posts_count", posts),
            ("likes_total", likes),
        )
    }


async def _traffic(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine, expire_on_commit=False) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        await s.commit()
        follows = [Follow(follower_id=2 + i, followed_id=1) for i in range(3)]
        for follow in follows:  # one transaction each: one delta row each
            s.add(follow)
            await s.commit()
        # Keys from 1: MariaDB takes an explicit 0 in an AUTO_INCREMENT key as "generate one".
        posts = [
            Post(id=i + 1, author_id=1 + i % 2, published=i % 3 == 0, likes=i) for i in range(9)
        ]
        s.add_all(posts)
        await s.commit()
        posts[0].author_id = 3  # FK move
        posts[1].published = True  # where= flip
        await s.delete(posts[2])
        await s.commit()
        await s.execute(sa.insert(Follow), [{"follower_id": 5, "followed_id": 2} for _ in range(4)])
        await s.execute(sa.update(Post).where(Post.author_id == 2).values(likes=Post.likes + 1))
        await s.execute(sa.delete(Follow).where(Follow.id == follows[0].id))
        await s.commit()
        s.add(Follow(follower_id=4, followed_id=1))
        await s.flush()
        await s.rollback()  # its delta goes with it
        assert (await s.execute(PENDING)).scalar_one() > 0
        for uid in (1, 2, 3):
            user = await s.get(User, uid)
            assert user is not None
            truth = await _truth(s, uid)
            for name, actual in truth.items():
                # The exact read, through the async session: column + pending deltas.
                assert await s.run_sync(counter_value, user, name) == actual, (uid, name)
        # The embedded mode: the inline fold runs on this event loop after the commit.
        configure_folding(inline=True, interval=0.05)
        s.add(Follow(follower_id=3, followed_id=2))
        await s.commit()
        for _ in range(600):
            if (await s.execute(PENDING)).scalar_one() == 0:
                break
            await s.rollback()  # a fresh snapshot for the next look
            await asyncio.sleep(0.05)
        assert (await s.execute(PENDING)).scalar_one() == 0, "the inline fold did not run"


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "aiosqlite", "aiomysql"])
def test_buffered_counters_through_an_async_session(
    driver: str, request: pytest.FixtureRequest
) -> None:
    engine, sync = _async_engine(driver, request)
    try:
        asyncio.run(_run(engine))
        assert drift(sync) == []
        assert column_drift(sync) == []  # folded inline: the columns alone are exact
        assert pending_count(sync) == 0
        with sync.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM follows")) == 7
    finally:
        sync.dispose()


async def _run(engine: AsyncEngine) -> None:
    try:
        await _traffic(engine)
    finally:
        await engine.dispose()
