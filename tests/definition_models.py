"""Models whose counter definitions are pinned in test_definitions (golden fingerprints).

Varied ``where=`` forms (IS, comparisons, IN, LIKE, NOT, a bound string) so
that a SQLAlchemy version compiling any of them differently shows up as a
changed fingerprint.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class Board(Base):
    __tablename__ = "boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    pins_count: Mapped[int] = counter_cache("Pin.board_id")
    visible_count: Mapped[int] = counter_cache(
        "Pin.board_id",
        where=lambda: sa.and_(
            Pin.hidden.is_(False), Pin.score >= 5, Pin.kind.in_(["photo", "video"])
        ),
    )
    drafts_count: Mapped[int] = counter_cache(
        "Pin.board_id", where=lambda: sa.not_(Pin.title.like("%'draft'%"))
    )
    score_total: Mapped[int] = counter_cache("Pin.board_id", sum="score")


class Pin(Base):
    __tablename__ = "pins"
    id: Mapped[int] = mapped_column(primary_key=True)
    board_id: Mapped[int] = mapped_column(sa.ForeignKey("boards.id"))
    hidden: Mapped[bool] = mapped_column(default=False)
    score: Mapped[int] = mapped_column(default=0)
    kind: Mapped[str] = mapped_column(sa.String(10), default="photo")
    title: Mapped[str] = mapped_column(sa.String(50), default="")
