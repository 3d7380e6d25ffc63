"""AsyncSession keeps counters exact on asyncpg, psycopg's async driver, aiosqlite and aiomysql."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest
import sqlalchemy as sa
from pin_models import Base, Board, Pin, assert_exact
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine


def _async_engine(driver: str, request: pytest.FixtureRequest) -> tuple[AsyncEngine, sa.Engine]:
    """The async engine under test and a sync engine on the same database for the truth."""
    if driver == "aiosqlite":
        url = request.getfixturevalue("sqlite_url")
        return create_async_engine(
            url.replace("sqlite://", "sqlite+aiosqlite://")
        ), sa.create_engine(url)
    if driver == "aiomysql":  # MariaDB
        url = request.getfixturevalue("mariadb_url")
        return create_async_engine(url.replace("+pymysql", "+aiomysql")), sa.create_engine(url)
    url = request.getfixturevalue("pg_url")
    if driver == "psycopg":
        return create_async_engine(url), sa.create_engine(url)
    # asyncpg takes no libpq "options": pass the test schema as a server setting.
    base, _, query = url.partition("?options=")
    schema = unquote(query).removeprefix("-csearch_path=")
    engine = create_async_engine(
        base.replace("+psycopg", "+asyncpg"),
        connect_args={"server_settings": {"search_path": schema}},
    )
    return engine, sa.create_engine(url)


async def _traffic(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine, expire_on_commit=False) as s:
        s.add_all([Board(id=i) for i in (1, 2, 3)])
        await s.commit()
        pins = [Pin(id=i, board_id=1 + i % 3, likes=i % 4) for i in range(1, 13)]
        s.add_all(pins)
        await s.commit()
        board = await s.get(Board, 1)
        assert board is not None
        await s.refresh(board)
        assert board.pins_count == 4  # the flush's deltas are visible to async reads
        pins[0].board_id = 3  # FK move
        pins[1].likes = 9  # where= flip and sum change
        await s.delete(pins[2])
        await s.commit()
        # Bulk statements through the async session.
        await s.execute(
            sa.insert(Pin), [{"id": 100 + i, "board_id": 2, "likes": 1} for i in range(5)]
        )
        await s.execute(sa.update(Pin).where(Pin.board_id == 3).values(board_id=1))
        await s.execute(sa.delete(Pin).where(Pin.likes == 0))
        await s.commit()
        # A rollback discards the deltas with the rows.
        s.add(Pin(id=500, board_id=2))
        await s.flush()
        await s.rollback()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "aiosqlite", "aiomysql"])
def test_async_session_keeps_counters_exact(driver: str, request: pytest.FixtureRequest) -> None:
    engine, sync = _async_engine(driver, request)
    try:
        asyncio.run(_run(engine))
        assert_exact(sync)
        with sync.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM pins")).scalar_one() > 0
    finally:
        sync.dispose()


async def _run(engine: AsyncEngine) -> None:
    try:
        await _traffic(engine)
    finally:
        await engine.dispose()
