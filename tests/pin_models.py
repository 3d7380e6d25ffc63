"""Boards and pins: the models of the read-only, legacy-API and relationship-move tests."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class Board(Base):
    __tablename__ = "boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40), default="")
    pins_count: Mapped[int] = counter_cache("Pin.board_id")
    liked_pins: Mapped[int] = counter_cache("Pin.board_id", where=lambda: Pin.likes > 0)
    likes_total: Mapped[int] = counter_cache("Pin.board_id", sum="likes")
    cover_count: Mapped[int] = counter_cache("Pin.cover_of_id")

    pins: Mapped[list[Pin]] = relationship(back_populates="board", foreign_keys="Pin.board_id")


class Pin(Base):
    __tablename__ = "pins"
    id: Mapped[int] = mapped_column(primary_key=True)
    board_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"), index=True)
    likes: Mapped[int] = mapped_column(default=0)
    title: Mapped[str] = mapped_column(sa.String(40), default="")
    # A board's cover pin points back at the board through a second FK: the
    # cycle needs post_update, which writes the FK in a second UPDATE.
    cover_of_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"))

    board: Mapped[Board | None] = relationship(back_populates="pins", foreign_keys=[board_id])
    cover_of: Mapped[Board | None] = relationship(foreign_keys=[cover_of_id], post_update=True)


TRUTH = {
    "pins_count": "SELECT board_id, COUNT(*) FROM pins GROUP BY board_id",
    "liked_pins": "SELECT board_id, COUNT(*) FROM pins WHERE likes > 0 GROUP BY board_id",
    "likes_total": "SELECT board_id, SUM(likes) FROM pins GROUP BY board_id",
    "cover_count": "SELECT cover_of_id, COUNT(*) FROM pins GROUP BY cover_of_id",
}


def drift(engine: sa.Engine) -> dict[str, tuple[int, int]]:
    """``{"boards.col[id]": (cached, truth)}`` for every wrong counter, by the test's own SQL."""
    wrong: dict[str, tuple[int, int]] = {}
    cols = ", ".join(TRUTH)
    with engine.connect() as conn:
        cached = {r[0]: r[1:] for r in conn.execute(sa.text(f"SELECT id, {cols} FROM boards"))}
        for i, (col, query) in enumerate(TRUTH.items()):
            truth = {k: int(v) for k, v in conn.execute(sa.text(query)) if k is not None}
            for pid, row in cached.items():
                if row[i] != truth.get(pid, 0):
                    wrong[f"boards.{col}[{pid}]"] = (row[i], truth.get(pid, 0))
    return wrong


def assert_exact(engine: sa.Engine) -> None:
    """Every board counter equals the test's own COUNT/SUM."""
    wrong = drift(engine)
    assert not wrong, f"drift (cached, truth): {wrong}"


def cached(engine: sa.Engine, board_id: int, col: str = "pins_count") -> int:
    with engine.connect() as conn:
        q = sa.text(f"SELECT {col} FROM boards WHERE id = :i")
        return int(conn.execute(q, {"i": board_id}).scalar_one())
