"""Inheritance: a subclass counter counts only that subclass; live, bulk, verify and reads agree."""

from __future__ import annotations

from collections.abc import Iterator

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
from sqlalchemy.orm import Session

from alembic_counterfill import counter_value, counters_of
from alembic_counterfill.verify import verify


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Topic(id=i) for i in (1, 2, 3)] + [Board(id=i) for i in (1, 2, 3)])
        s.commit()
    yield engine


def values(engine: sa.Engine, table: str, cols: str, pid: int) -> tuple[int, ...]:
    with engine.connect() as conn:
        row = conn.execute(sa.text(f"SELECT {cols} FROM {table} WHERE id = {pid}")).one()
    return tuple(int(v) for v in row)


def test_single_table_flushes(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Comment(topic_id=1), Comment(topic_id=1, flagged=True), Note(topic_id=1)])
        s.add(Entry(topic_id=1))
        s.add(Note(topic_id=2, words=7))
        s.commit()
        cols = "entries_count, comments_count, flagged_comments, note_words"
        assert values(db, "topics", cols, 1) == (4, 2, 1, 0)
        assert_exact(db)
        c = s.scalars(sa.select(Comment).where(Comment.flagged)).one()
        c.topic_id = 2
        n = s.scalars(sa.select(Note).where(Note.topic_id == 2)).one()
        n.words = 10
        s.commit()
        assert values(db, "topics", cols, 2) == (2, 1, 1, 10)
        assert_exact(db)
        for obj in s.scalars(sa.select(Comment)):
            s.delete(obj)
        s.commit()
    assert_exact(db)


def test_joined_table_flushes(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Pin(board_id=1, hot=True, origin_id=2), Pin(board_id=1), Video(board_id=1)])
        s.add(Item(board_id=1))
        s.commit()
        cols = "items_count, pins_count, hot_pins, origins_count"
        assert values(db, "boards", cols, 1) == (4, 2, 1, 0)
        assert values(db, "boards", cols, 2) == (0, 0, 0, 1)
        assert_exact(db)
        hot = s.scalars(sa.select(Pin).where(Pin.hot)).one()
        hot.board_id = 2
        hot.origin_id = 3
        cold = s.scalars(sa.select(Pin).where(Pin.hot.is_(False))).one()
        cold.hot = True  # where= on the joined subclass's own column
        s.commit()
        assert_exact(db)
        s.delete(hot)
        s.delete(s.scalars(sa.select(Video)).one())
        s.commit()
    assert_exact(db)


def test_bulk_statements(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Comment), [{"topic_id": 1}, {"topic_id": 1, "flagged": True}])
        s.execute(sa.insert(Note), [{"topic_id": 1, "words": 3}])
        s.execute(sa.insert(Entry), [{"topic_id": 2, "kind": "entry"}])
        s.execute(sa.insert(Pin), [{"board_id": 1, "hot": True}, {"board_id": 1, "origin_id": 3}])
        s.execute(sa.insert(Video), [{"board_id": 1}])
        s.commit()
        assert_exact(db)
        s.execute(sa.update(Comment).where(Comment.flagged).values(topic_id=3))
        s.execute(sa.update(Note).values(words=Note.words + 1))
        s.commit()
        assert_exact(db)
        s.execute(sa.delete(Comment).where(Comment.topic_id == 1))
        s.execute(sa.update(Pin).where(Pin.hot.is_(False)).values(hot=True))
        s.commit()
    assert_exact(db)


def test_verify_and_reads_agree(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Comment(topic_id=1), Comment(topic_id=1, flagged=True), Note(topic_id=1)])
        s.add_all([Pin(board_id=1, hot=True), Pin(board_id=1), Video(board_id=1)])
        s.commit()
    assert_exact(db)
    counters = counters_of(Base)
    assert verify(db, counters) == []  # exact counters: no drift reported
    with db.begin() as conn:  # drift them the way raw SQL would
        conn.execute(sa.text("UPDATE topics SET comments_count = 9, note_words = 5"))
        conn.execute(sa.text("UPDATE boards SET pins_count = 9, hot_pins = 9"))
    fixed = verify(db, counters, fix=True)
    assert fixed and all(d.fixed for d in fixed)
    assert_exact(db)
    assert verify(db, counters) == []
    with Session(db) as s:
        topic, board = s.get(Topic, 1), s.get(Board, 1)
        assert counter_value(s, topic, "comments_count") == 2
        assert counter_value(s, topic, "flagged_comments") == 1
        assert counter_value(s, topic, "entries_count") == 3
        assert counter_value(s, board, "pins_count") == 2
        assert counter_value(s, board, "hot_pins") == 1
        assert counter_value(s, board, "items_count") == 3


def test_backfill_counts_subclass_rows(db: sa.Engine) -> None:
    from alembic_counterfill import planning
    from alembic_counterfill.progress import ensure_tables
    from alembic_counterfill.runner import run_inline

    with Session(db) as s:
        s.add_all([Comment(topic_id=1), Comment(topic_id=2, flagged=True), Note(topic_id=1)])
        s.add_all([Pin(board_id=1, hot=True, origin_id=3), Video(board_id=1), Item(board_id=2)])
        s.commit()
    with db.begin() as conn:  # as after adding the columns: every counter at 0
        conn.execute(
            sa.text(
                "UPDATE topics SET entries_count = 0, comments_count = 0,"
                " flagged_comments = 0, note_words = 0"
            )
        )
        conn.execute(
            sa.text(
                "UPDATE boards SET items_count = 0, pins_count = 0, hot_pins = 0, origins_count = 0"
            )
        )
    counters = {c.key: c for c in counters_of(Base)}
    with db.begin() as conn:
        ensure_tables(conn)
        plan = planning.plan(conn, list(counters.values()), 2)
    run_inline(db, counters, plan.batch_ids)
    assert_exact(db)
