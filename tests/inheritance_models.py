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
    # A Float sum: the counter column is a Float too (sums follow the summed column).
    note_score: Mapped[float] = counter_cache("Note.topic_id", sum="score")


class Entry(Base):
    """Single-table inheritance: every kind of entry lives in ``entries``."""

    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    topic_id: Mapped[int | None] = mapped_column(sa.ForeignKey("topics.id"), index=True)
    flagged: Mapped[bool] = mapped_column(default=False)
    words: Mapped[int] = mapped_column(default=0)
    score: Mapped[float] = mapped_column(sa.Float, default=0.0)
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
    # sum= and where= over a joined subclass's own columns (videos), FK in the base (items).
    video_seconds: Mapped[int] = counter_cache("Video.board_id", sum="seconds")
    long_videos: Mapped[int] = counter_cache("Video.board_id", where=lambda: Video.seconds >= 60)
    video_rating: Mapped[float] = counter_cache(
        "Video.board_id", sum="rating", where=lambda: Video.seconds > 0
    )


class Item(Base):
    """Joined-table inheritance: ``pins`` and ``videos`` rows join ``items`` on ``id``."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(sa.String(20))
    board_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"), index=True)
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "item"}


class Pin(Item):
    __tablename__ = "pins"
    # ON DELETE CASCADE: a bulk delete(Item) would delete pins rows unseen (refused).
    id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    hot: Mapped[bool] = mapped_column(default=False)
    origin_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boards.id"))
    __mapper_args__ = {"polymorphic_identity": "pin"}


class Video(Item):
    __tablename__ = "videos"
    # ON DELETE CASCADE: delete(Item) removes videos rows too (no counter counts them).
    id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    seconds: Mapped[int] = mapped_column(default=0)
    rating: Mapped[float] = mapped_column(sa.Float, default=0.0)
    __mapper_args__ = {"polymorphic_identity": "video"}


TOPIC_TRUTH = {
    "entries_count": "SELECT topic_id, COUNT(*) FROM entries GROUP BY topic_id",
    "comments_count": "SELECT topic_id, COUNT(*) FROM entries WHERE kind = 'comment'"
    " GROUP BY topic_id",
    "flagged_comments": "SELECT topic_id, COUNT(*) FROM entries WHERE kind = 'comment'"
    " AND flagged GROUP BY topic_id",
    "note_words": "SELECT topic_id, SUM(words) FROM entries WHERE kind = 'note' GROUP BY topic_id",
    "note_score": "SELECT topic_id, SUM(score) FROM entries WHERE kind = 'note' GROUP BY topic_id",
}
BOARD_TRUTH = {
    "items_count": "SELECT board_id, COUNT(*) FROM items GROUP BY board_id",
    "pins_count": "SELECT i.board_id, COUNT(*) FROM items i JOIN pins p ON p.id = i.id"
    " GROUP BY i.board_id",
    "hot_pins": "SELECT i.board_id, COUNT(*) FROM items i JOIN pins p ON p.id = i.id"
    " WHERE p.hot GROUP BY i.board_id",
    "origins_count": "SELECT origin_id, COUNT(*) FROM pins GROUP BY origin_id",
    "video_seconds": "SELECT i.board_id, SUM(v.seconds) FROM items i JOIN videos v ON v.id = i.id"
    " GROUP BY i.board_id",
    "long_videos": "SELECT i.board_id, COUNT(*) FROM items i JOIN videos v ON v.id = i.id"
    " WHERE v.seconds >= 60 GROUP BY i.board_id",
    "video_rating": "SELECT i.board_id, SUM(v.rating) FROM items i JOIN videos v ON v.id = i.id"
    " WHERE v.seconds > 0 GROUP BY i.board_id",
}


def _compare(conn: sa.Connection, table: str, truths: dict[str, str]) -> dict[str, object]:
    wrong: dict[str, object] = {}
    cols = ", ".join(truths)
    cached = {r[0]: r[1:] for r in conn.execute(sa.text(f"SELECT id, {cols} FROM {table}"))}
    for i, (col, query) in enumerate(truths.items()):
        # Float sums compare with ==: the tests write dyadic values (0.25, 1.5), whose
        # sums are exact in any order of additions.
        truth = {k: float(v) for k, v in conn.execute(sa.text(query)) if k is not None}
        for pid, row in cached.items():
            if float(row[i]) != truth.get(pid, 0):
                wrong[f"{table}.{col}[{pid}]"] = (row[i], truth.get(pid, 0))
    return wrong


def assert_exact(engine: sa.Engine) -> None:
    """Every topic and board counter equals the test's own COUNT/SUM."""
    with engine.connect() as conn:
        wrong = _compare(conn, "topics", TOPIC_TRUTH) | _compare(conn, "boards", BOARD_TRUTH)
    assert not wrong, f"drift (cached, truth): {wrong}"
