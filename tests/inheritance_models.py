"""Single-table and joined-table inheritance hierarchies with counters on base and subclasses."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class Topic(Base):
    __tablename__ = "topics"
    id: Mapped[int] = mapped_column(primary_key=True)
    entries_count: Mapped[int] = counter_cache("Entry.topic_id")
    comments_count: Mapped[int] = counter_cache("Comment.topic_id")
    flagged_comments: Mapped[int] = counter_cache(
        "Comment.topic_id", where=lambda: Comment.flagged.is_(True)
    )
    note_words: Mapped[int] = counter_cache("Note.topic_id", sum="words")


class Entry(Base):
    """Single-table inheritance: every kind of entry lives in ``entries``."""

    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    topic_id: Mapped[int | None] = mapped_column(sa.ForeignKey("topics.id"), index=True)
    flagged: Mapped[bool] = mapped_column(default=False)
    words: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "entry"}


class Comment(Entry):
    __mapper_args__ = {"polymorphic_identity": "comment"}


class Note(Entry):
    __mapper_args__ = {"polymorphic_identity": "note"}


class Board(Base):
    __tablename__ = "boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    items_count: Mapped[int] = counter_cache("Item.board_id")
    pins_count: Mapped[int] = counter_cache("Pin.board_id")
    hot_pins: Mapped[int] = counter_cache("Pin.board_id", where=lambda: Pin.hot.is_(True))
    origins_count: Mapped[int] = counter_cache("Pin.origin_id")


class Item(Base):
    """Joined-table inheritance: ``pins`` and ``videos`` rows join ``items`` on ``id``."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(sa.String(20))
    board_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"), index=True)
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "item"}


class Pin(Item):
    __tablename__ = "pins"
    id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), primary_key=True)
    hot: Mapped[bool] = mapped_column(default=False)
    origin_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"))
    __mapper_args__ = {"polymorphic_identity": "pin"}


class Video(Item):
    __tablename__ = "videos"
    id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), primary_key=True)
    seconds: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "video"}


TOPIC_TRUTH = {
    "entries_count": "SELECT topic_id, COUNT(*) FROM entries GROUP BY topic_id",
    "comments_count": "SELECT topic_id, COUNT(*) FROM entries WHERE kind = 'comment'"
    " GROUP BY topic_id",
    "flagged_comments": "SELECT topic_id, COUNT(*) FROM entries WHERE kind = 'comment'"
    " AND flagged GROUP BY topic_id",
    "note_words": "SELECT topic_id, SUM(words) FROM entries WHERE kind = 'note' GROUP BY topic_id",
}
BOARD_TRUTH = {
    "items_count": "SELECT board_id, COUNT(*) FROM items GROUP BY board_id",
    "pins_count": "SELECT i.board_id, COUNT(*) FROM items i JOIN pins p ON p.id = i.id"
    " GROUP BY i.board_id",
    "hot_pins": "SELECT i.board_id, COUNT(*) FROM items i JOIN pins p ON p.id = i.id"
    " WHERE p.hot GROUP BY i.board_id",
    "origins_count": "SELECT origin_id, COUNT(*) FROM pins GROUP BY origin_id",
}


def _compare(conn: sa.Connection, table: str, truths: dict[str, str]) -> dict[str, object]:
    wrong: dict[str, object] = {}
    cols = ", ".join(truths)
    cached = {r[0]: r[1:] for r in conn.execute(sa.text(f"SELECT id, {cols} FROM {table}"))}
    for i, (col, query) in enumerate(truths.items()):
        truth = {k: int(v) for k, v in conn.execute(sa.text(query)) if k is not None}
        for pid, row in cached.items():
            if row[i] != truth.get(pid, 0):
                wrong[f"{table}.{col}[{pid}]"] = (row[i], truth.get(pid, 0))
    return wrong


def assert_exact(engine: sa.Engine) -> None:
    """Every topic and board counter equals the test's own COUNT/SUM."""
    with engine.connect() as conn:
        wrong = _compare(conn, "topics", TOPIC_TRUTH) | _compare(conn, "boards", BOARD_TRUTH)
    assert not wrong, f"drift (cached, truth): {wrong}"
