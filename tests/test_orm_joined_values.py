"""``sum=``/``where=`` over a joined subclass's own columns, Float sums, subclass bulk statements.

``Board.video_seconds`` sums ``videos.seconds`` while the FK is ``items.board_id``;
``long_videos`` and ``video_rating`` filter on ``videos.seconds``. Every check is
against the test's own COUNT/SUM (``inheritance_models.assert_exact``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from inheritance_models import (
    Base,
    Board,
    Comment,
    Entry,
    Item,
    Note,
    Pin,
    Topic,
    Video,
    assert_exact,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session

from alembic_counterfill import counter_value, counters_of
from alembic_counterfill.errors import CounterfillError
from alembic_counterfill.verify import verify

pytestmark = pytest.mark.timeout(300)

VIDEO_COLS = "video_seconds, long_videos, video_rating"


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Topic(id=i) for i in (1, 2, 3)] + [Board(id=i) for i in (1, 2, 3)])
        s.commit()
    yield engine


def row(engine: sa.Engine, table: str, cols: str, pid: int) -> tuple[float, ...]:
    with engine.connect() as conn:
        found = conn.execute(sa.text(f"SELECT {cols} FROM {table} WHERE id = {pid}")).one()
    return tuple(float(v) for v in found)


def test_joined_sum_and_where_on_flushes(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all(
            [
                Video(board_id=1, seconds=90, rating=1.5),
                Video(board_id=1, seconds=30, rating=0.25),
                Video(board_id=2, seconds=0, rating=4.0),  # where= false: no rating
                Pin(board_id=1),
            ]
        )
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 1) == (120, 1, 1.75)
        assert row(db, "boards", VIDEO_COLS, 2) == (0, 0, 0)
        assert_exact(db)
        short = s.scalars(sa.select(Video).where(Video.seconds == 30)).one()
        short.seconds = 75  # only the subclass's own column changes: where= flips
        zero = s.scalars(sa.select(Video).where(Video.seconds == 0)).one()
        zero.seconds = 10  # where= of the rating sum flips on
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 1) == (165, 2, 1.75)
        assert row(db, "boards", VIDEO_COLS, 2) == (10, 0, 4.0)
        assert_exact(db)
        short.board_id = 3  # FK (base table) and summed column (own table) in one flush
        short.seconds = 5
        short.rating = 0.5
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 3) == (5, 0, 0.5)
        assert_exact(db)
        s.delete(short)
        s.delete(zero)
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 2) == (0, 0, 0)
    assert_exact(db)


def test_joined_sum_and_where_on_bulk_statements(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(
            sa.insert(Video),
            [
                {"board_id": 1, "seconds": 60, "rating": 2.5},
                {"board_id": 1, "seconds": 5, "rating": 0.75},
                {"board_id": 2},  # defaults: 0 seconds, 0.0 rating
            ],
        )
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 1) == (65, 1, 3.25)
        assert_exact(db)
        s.execute(sa.update(Video).where(Video.seconds < 10).values(seconds=Video.seconds + 100))
        s.commit()
        assert_exact(db)
        # SQLAlchemy cannot SET a base-table column through update(Video): move by Item.
        moved = sa.select(Video.id).where(Video.seconds >= 100).scalar_subquery()
        s.execute(sa.update(Item).where(Item.id.in_(moved)).values(board_id=3))
        s.commit()
        assert_exact(db)
        # A statement on the base class moves videos (FK in items, values in videos).
        s.execute(sa.update(Item).where(Item.board_id == 1).values(board_id=2))
        s.commit()
        assert_exact(db)
        done = sa.select(Video.id).where(Video.seconds >= 100).scalar_subquery()
        s.execute(sa.delete(Item).where(Item.id.in_(done)))  # videos rows: ON DELETE CASCADE
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 3) == (0, 0, 0)
    assert_exact(db)


def test_core_table_statements_through_the_session(db: sa.Engine) -> None:
    """Core UPDATEs on either table of the joined subclass, run through the Session."""
    videos, items = Video.__table__, Item.__table__
    with Session(db) as s:
        s.add_all([Video(board_id=1, seconds=90, rating=1.0), Video(board_id=2, seconds=3)])
        s.commit()
        s.execute(sa.update(videos).where(videos.c.seconds == 3).values(seconds=61))
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 2) == (61, 1, 0)
        assert_exact(db)
        s.execute(sa.update(items).where(items.c.board_id == 1).values(board_id=3))
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 3) == (90, 1, 1.0)
    assert_exact(db)


def test_joined_sum_verify_backfill_and_reads(db: sa.Engine) -> None:
    from alembic_counterfill import planning
    from alembic_counterfill.progress import ensure_tables
    from alembic_counterfill.runner import run_inline

    with Session(db) as s:
        s.add_all([Video(board_id=1, seconds=90, rating=0.5), Video(board_id=1, seconds=20)])
        s.add_all([Video(board_id=2, seconds=61, rating=2.0), Pin(board_id=2, hot=True)])
        s.add_all([Note(topic_id=1, score=1.25), Note(topic_id=1, score=2.5)])
        s.commit()
    assert_exact(db)
    counters = counters_of(Base)
    assert verify(db, counters) == []
    with db.begin() as conn:  # drift them the way raw SQL would
        conn.execute(
            sa.text("UPDATE boards SET video_seconds = 7, long_videos = 9, video_rating = 3")
        )
        conn.execute(sa.text("UPDATE topics SET note_score = 0.5"))
    fixed = verify(db, counters, fix=True)
    assert {d.column for d in fixed} >= {"video_seconds", "long_videos", "video_rating"}
    assert_exact(db)
    with Session(db) as s:
        board = s.get(Board, 1)
        assert counter_value(s, board, "video_seconds") == 110
        assert counter_value(s, board, "long_videos") == 1
        assert counter_value(s, board, "video_rating") == 0.5
        assert counter_value(s, s.get(Topic, 1), "note_score") == 3.75
    with db.begin() as conn:  # as after adding the columns: every counter at 0
        conn.execute(
            sa.text("UPDATE boards SET video_seconds = 0, long_videos = 0, video_rating = 0")
        )
        conn.execute(sa.text("UPDATE topics SET note_score = 0"))
    by_key = {c.key: c for c in counters}
    with db.begin() as conn:
        ensure_tables(conn)
        plan = planning.plan(conn, list(by_key.values()), 2)
    run_inline(db, by_key, plan.batch_ids)
    assert_exact(db)


def test_float_sum_live_deltas(db: sa.Engine) -> None:
    """A Float sum's deltas equal the SUM over rows (dyadic values: exact in any order)."""
    with Session(db) as s:
        notes = [Note(topic_id=1, score=v) for v in (0.5, 1.25, 2.75, 0.125)]
        s.add_all(notes)
        s.add(Comment(topic_id=1, score=100.0))  # not a Note: not summed
        s.commit()
        assert row(db, "topics", "note_score", 1) == (4.625,)
        notes[0].score = 3.5
        notes[1].topic_id = 2
        s.delete(notes[2])
        s.commit()
        assert row(db, "topics", "note_score", 1) == (3.625,)
        assert row(db, "topics", "note_score", 2) == (1.25,)
        s.execute(sa.insert(Note), [{"topic_id": 2, "score": 0.375}])
        s.execute(sa.update(Note).where(Note.topic_id == 2).values(score=Note.score * 2))
        s.commit()
        assert row(db, "topics", "note_score", 2) == (3.25,)
    assert_exact(db)


def test_subclass_bulk_updates_and_single_table_deletes(db: sa.Engine) -> None:
    """ORM-enabled UPDATE of a joined subclass, DELETE of a single-table subclass."""
    with Session(db) as s:
        s.add_all([Pin(board_id=1, hot=True), Pin(board_id=1), Pin(board_id=2, hot=True)])
        s.add_all([Video(board_id=1, seconds=70), Item(board_id=1)])
        s.add_all([Comment(topic_id=1), Comment(topic_id=1, flagged=True), Note(topic_id=1)])
        s.add(Entry(topic_id=1))
        s.commit()
        s.execute(sa.update(Pin).where(Pin.hot).values(origin_id=1, hot=False))
        # Criteria on a base-table column need the key join (SQLAlchemy adds none).
        on_board_1 = sa.select(Pin.id).where(Pin.board_id == 1).correlate(None).scalar_subquery()
        s.execute(sa.update(Pin).where(Pin.id.in_(on_board_1)).values(hot=True))
        s.commit()
        assert row(db, "boards", "pins_count, hot_pins, origins_count", 1) == (2, 2, 2)
        assert_exact(db)
        s.execute(sa.delete(Comment).where(Comment.flagged))
        s.commit()
        assert row(db, "topics", "entries_count, comments_count, flagged_comments", 1) == (3, 1, 0)
        assert_exact(db)
        s.execute(sa.delete(Note))  # no WHERE: the discriminator alone limits it
        s.commit()
        assert row(db, "topics", "entries_count, comments_count", 1) == (2, 1)
    assert_exact(db)


def _counts(engine: sa.Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.scalar(sa.text(f"SELECT COUNT(*) FROM {t}")) for t in ("items", "pins", "videos")
        )


def test_joined_subclass_bulk_delete_is_refused(db: sa.Engine) -> None:
    """delete(Pin) would leave the items rows: refused, nothing written, counters exact."""
    with Session(db) as s:
        s.add_all([Pin(board_id=1, hot=True), Pin(board_id=2), Video(board_id=1, seconds=90)])
        s.commit()
    before = _counts(db)
    pins = Pin.__table__
    for stmt in (
        sa.delete(Pin).where(Pin.hot),
        sa.delete(Video).where(Video.seconds > 10),
        sa.delete(pins).where(pins.c.origin_id.is_(None)),  # Core, through the Session
    ):
        with Session(db) as s, pytest.raises(CounterfillError, match="session.delete"):
            s.execute(stmt)
    assert _counts(db) == before
    assert_exact(db)
    with Session(db) as s:  # the way the refusal names: the ORM deletes both rows
        for obj in s.scalars(sa.select(Pin).where(Pin.hot)):
            s.delete(obj)
        s.commit()
    assert _counts(db) == (before[0] - 1, before[1] - 1, before[2])
    assert_exact(db)


def test_base_class_bulk_delete_with_cascade(db: sa.Engine) -> None:
    """delete(Item) of videos is exact (their counters count items rows); of pins, refused.

    The database deletes pins rows with their items rows (ON DELETE CASCADE)
    unseen, and ``Board.origins_count`` counts pins rows.
    """
    with Session(db) as s:
        s.add_all([Video(board_id=1, seconds=90, rating=1.5), Video(board_id=2, seconds=30)])
        s.add_all([Pin(board_id=1, origin_id=2), Item(board_id=1)])
        s.commit()
        videos = sa.select(Video.id).where(Video.seconds > 60).scalar_subquery()
        s.execute(sa.delete(Item).where(Item.id.in_(videos)))
        s.commit()
        assert row(db, "boards", "items_count, " + VIDEO_COLS, 1) == (2, 0, 0, 0)
        assert_exact(db)
        with pytest.raises(CounterfillError, match="ON DELETE CASCADE"):
            s.execute(sa.delete(Item).where(Item.board_id == 1))
        s.rollback()
    assert _counts(db)[0] == 3
    assert_exact(db)


def _upsert(engine: sa.Engine, cls: Any, set_: tuple[str, ...], nothing: bool = False) -> Any:
    """The backend's upsert of ``cls``: ON CONFLICT (id) DO UPDATE/NOTHING, ON DUPLICATE KEY."""
    if engine.dialect.name in ("mysql", "mariadb"):
        ins = mysql.insert(cls)
        if nothing:
            return ins.prefix_with("IGNORE")
        return ins.on_duplicate_key_update({k: ins.inserted[k] for k in set_})
    ins = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(cls)
    if nothing:
        return ins.on_conflict_do_nothing(index_elements=["id"])
    return ins.on_conflict_do_update(index_elements=["id"], set_={k: ins.excluded[k] for k in set_})


def test_single_table_subclass_upserts(db: sa.Engine) -> None:
    """Upserts of Note rows: new rows counted, existing rows moved and re-summed exactly."""
    with Session(db) as s:
        s.add_all([Note(id=1, topic_id=1, words=3, score=0.5), Comment(id=2, topic_id=1)])
        s.commit()
        rows = [
            {"id": 1, "topic_id": 2, "words": 10, "score": 1.25},  # moves note 1
            {"id": 3, "topic_id": 2, "words": 4, "score": 0.25},  # new
        ]
        s.execute(_upsert(db, Note, ("topic_id", "words", "score")), rows)
        s.commit()
        assert row(db, "topics", "entries_count, note_words, note_score", 2) == (2, 14, 1.5)
        assert_exact(db)
        s.execute(
            _upsert(db, Note, (), nothing=True),
            [{"id": 3, "topic_id": 1, "words": 99}, {"id": 4, "topic_id": 1, "words": 1}],
        )
        s.commit()
        assert row(db, "topics", "entries_count, note_words", 1) == (2, 1)
    assert_exact(db)


def test_joined_subclass_upserts_are_refused_by_sqlalchemy(db: sa.Engine) -> None:
    """SQLAlchemy itself refuses an upsert of a two-table class: nothing written, exact."""
    with Session(db) as s:
        s.add(Video(id=1, board_id=1, seconds=90, rating=0.5))
        s.commit()
        before = _counts(db)
        stmt = _upsert(db, Video, ("seconds", "rating"))
        with pytest.raises(sa.exc.InvalidRequestError, match="not supported for multi-table"):
            s.execute(stmt, [{"id": 1, "board_id": 1, "seconds": 10}, {"id": 2, "board_id": 2}])
        s.rollback()
    assert _counts(db) == before
    assert_exact(db)


def test_core_insert_into_a_subclass_table(db: sa.Engine) -> None:
    """Core INSERTs into items then videos, through the Session (videos rows decide sums)."""
    items, videos = Item.__table__, Video.__table__
    with Session(db) as s:
        s.execute(sa.insert(items), [{"id": 5, "type": "video", "board_id": 1}])
        s.execute(sa.insert(videos), [{"id": 5, "seconds": 70, "rating": 0.5}])
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 1) == (70, 1, 0.5)
        # An upsert into the subclass table alone: the existing row's values change.
        s.execute(_upsert(db, videos, ("seconds",)), [{"id": 5, "seconds": 12, "rating": 9.0}])
        s.commit()
        assert row(db, "boards", VIDEO_COLS, 1) == (12, 0, 0.5)
    assert_exact(db)


def test_core_insert_into_a_subclass_table_read_by_counters_is_refused(db: sa.Engine) -> None:
    """``pins`` rows feed counters over two tables: a Core INSERT into pins alone is refused."""
    items, pins = Item.__table__, Pin.__table__
    with Session(db) as s:
        s.execute(sa.insert(items), [{"id": 5, "type": "item", "board_id": 1}])
        s.commit()
        with pytest.raises(CounterfillError, match=r"insert\(Pin\)"):
            s.execute(sa.insert(pins), [{"id": 5, "hot": True, "origin_id": 2}])
        s.rollback()
    assert _counts(db) == (1, 0, 0)
    assert_exact(db)


def test_cli_describes_a_joined_sum_by_its_own_table() -> None:
    from alembic_counterfill.cli import describe_counter

    by_key = {c.key: c for c in counters_of(Base)}
    text = describe_counter(by_key["boards.video_seconds"])
    assert text.startswith("SUM(videos.seconds) BY items.board_id"), text


def test_cartesian_update_of_a_joined_subclass(db: sa.Engine) -> None:
    """update(Pin).where(Pin.board_id == 1): no key join, so SQLAlchemy updates every pin.

    On SQLite the library refuses it (nothing written); elsewhere its key
    restriction limits it to the rows of the joined class. Exact either way.
    """
    with Session(db) as s:
        s.add_all([Pin(board_id=1), Pin(board_id=2), Pin(board_id=3, hot=True)])
        s.commit()
        stmt = sa.update(Pin).where(Pin.board_id == 1).values(hot=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # SQLAlchemy's cartesian warning
            if db.dialect.name == "sqlite":
                with pytest.raises(CounterfillError, match="cartesian"):
                    s.execute(stmt)
                s.rollback()
            else:
                s.execute(stmt)
                s.commit()
    assert_exact(db)
    with db.connect() as conn:
        hot = conn.execute(sa.text("SELECT id FROM pins WHERE hot ORDER BY id")).scalars().all()
    assert hot == ([3] if db.dialect.name == "sqlite" else [1, 3])
