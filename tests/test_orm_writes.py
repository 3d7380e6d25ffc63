"""Counter columns are read-only; legacy bulk API, Query.update/delete, moves and post_update."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pin_models import Base, Board, Pin, assert_exact, cached
from sqlalchemy.orm import Session

from alembic_counterfill import CounterfillError
from alembic_counterfill.errors import CounterfillWarning


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Board(id=i) for i in range(1, 5)])
        s.commit()
    yield engine


# --- read-only counter columns ---------------------------------------------------------------


def test_merge_of_stale_detached_parent_keeps_database_value(db: sa.Engine) -> None:
    with Session(db, expire_on_commit=False) as s:
        stale = s.get(Board, 1)
        assert stale is not None and stale.pins_count == 0
    with Session(db) as s:
        s.add_all([Pin(board_id=1, likes=2) for _ in range(3)])
        s.commit()
    assert stale.pins_count == 0  # detached, loaded before the pins were added
    stale.name = "renamed"
    with Session(db) as s:
        merged = s.merge(stale)
        s.commit()
        assert merged.pins_count == 3  # refreshed from the database
        assert merged.name == "renamed"
    assert cached(db, 1) == 3
    assert_exact(db)


def test_assignment_is_never_written_and_warns(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add(Pin(board_id=2))
        s.commit()
        board = s.get(Board, 2)
        assert board is not None
        with pytest.warns(CounterfillWarning, match=r"Board\.pins_count.*verify --fix"):
            board.pins_count = 99
        s.commit()
        assert board.pins_count == 1
    assert cached(db, 2) == 1
    with Session(db) as s, pytest.warns(CounterfillWarning):
        s.add(Board(id=10, pins_count=7))  # a new parent starts from its real children
        s.commit()
    assert cached(db, 10) == 0
    assert_exact(db)


def test_stale_copy_in_session_is_never_written(db: sa.Engine) -> None:
    with Session(db, expire_on_commit=False) as a, Session(db) as b:
        board = a.get(Board, 3)
        assert board is not None
        b.add_all([Pin(board_id=3), Pin(board_id=3)])
        b.commit()
        board.name = "x"  # session a still holds pins_count == 0
        a.commit()
    assert cached(db, 3) == 2
    assert_exact(db)


def test_deliberate_core_update_is_allowed(db: sa.Engine) -> None:
    # The documented way to set a counter by hand: a Core statement (or verify --fix).
    with db.begin() as conn:
        conn.execute(sa.update(Board).where(Board.id == 4).values(pins_count=5))
    assert cached(db, 4) == 5


# --- legacy bulk API ---------------------------------------------------------------------------


def test_bulk_insert_mappings(db: sa.Engine) -> None:
    with Session(db) as s:
        try:
            s.bulk_insert_mappings(Pin, [{"board_id": 1, "likes": 2}, {"board_id": 2}])  # type: ignore[arg-type]
            s.commit()
        except CounterfillError as exc:
            assert "session.execute(insert(Pin), rows)" in str(exc)
            s.rollback()
    assert_exact(db)


def pin_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM pins")).scalar_one())


def test_bulk_save_objects_is_refused_before_writing(db: sa.Engine) -> None:
    with Session(db) as s:
        with pytest.raises(CounterfillError, match=r"session\.execute\(insert\(Pin\), rows\)"):
            s.bulk_save_objects([Pin(id=1, board_id=1, likes=3), Pin(id=2, board_id=2)])
        s.commit()  # the refusal came before any statement: nothing to roll back
        assert pin_count(db) == 0
        s.add(Pin(id=5, board_id=1))
        s.commit()
        pin = s.get(Pin, 5)
        assert pin is not None
        pin.board_id = 3
        with pytest.raises(CounterfillError, match="nothing was written"):
            s.bulk_save_objects([pin])
        s.rollback()
    assert cached(db, 1) == 1
    assert_exact(db)


def test_bulk_insert_mappings_with_return_defaults_is_refused(db: sa.Engine) -> None:
    with Session(db) as s:
        with pytest.raises(CounterfillError, match=r"insert\(Pin\)\.returning"):
            s.bulk_insert_mappings(Pin, [{"board_id": 1}], return_defaults=True)  # type: ignore[arg-type]
        s.commit()
    assert pin_count(db) == 0
    assert_exact(db)


def test_legacy_bulk_api_untouched_for_uncounted_classes(db: sa.Engine) -> None:
    with Session(db) as s:
        s.bulk_insert_mappings(Board, [{"id": 20, "name": "x"}])  # type: ignore[arg-type]
        s.bulk_update_mappings(Board, [{"id": 20, "name": "y"}])  # type: ignore[arg-type]
        s.bulk_save_objects([Board(id=21)])
        s.commit()
        assert s.get(Board, 20).name == "y"  # type: ignore[union-attr]


def test_bulk_update_mappings(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Pin(id=1, board_id=1), Pin(id=2, board_id=1, likes=1)])
        s.commit()
        try:
            s.bulk_update_mappings(
                Pin, [{"id": 1, "board_id": 2, "likes": 4}, {"id": 2, "likes": 0}]
            )  # type: ignore[arg-type]
            s.commit()
        except CounterfillError as exc:
            assert "session.execute(update(Pin), rows)" in str(exc)
            s.rollback()
    assert_exact(db)


def test_legacy_query_update_and_delete(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Pin(id=i, board_id=1 + i % 3, likes=i % 2) for i in range(1, 10)])
        s.commit()
        s.query(Pin).filter(Pin.board_id == 1).update({Pin.board_id: 4})
        s.query(Pin).filter(Pin.likes == 0).update({"likes": 5}, synchronize_session="evaluate")
        s.commit()
        assert_exact(db)
        s.query(Pin).filter(Pin.board_id == 2).delete()
        s.commit()
    assert_exact(db)


# --- relationship moves, post_update, ordered_values -------------------------------------------


def test_relationship_moves_read_old_state_in_one_statement(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Pin(id=i, board_id=1) for i in range(1, 51)])
        s.commit()
    statements: list[str] = []

    def count(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        statements.append(statement)

    def moved(by_relationship: bool, dest: int) -> int:
        statements.clear()
        with Session(db) as s:
            pins = s.scalars(sa.select(Pin).where(Pin.board_id != dest)).all()
            other = s.get(Board, dest)
            sa.event.listen(db, "before_cursor_execute", count)
            try:
                for pin in pins:
                    if by_relationship:
                        pin.board = other
                    else:
                        pin.board_id = dest
                s.commit()
            finally:
                sa.event.remove(db, "before_cursor_execute", count)
        return len(
            [q for q in statements if "pins" in q and q.lstrip().upper().startswith("SELECT")]
        )

    by_fk = moved(False, 2)
    assert_exact(db)
    by_rel = moved(True, 3)
    assert_exact(db)
    assert by_rel <= by_fk, (by_rel, by_fk)
    assert by_rel <= 3


def test_post_update_relationship_moves(db: sa.Engine) -> None:
    with Session(db) as s:
        board = s.get(Board, 1)
        pin = Pin(id=1, board_id=1, cover_of=board)
        s.add(pin)
        s.commit()
        assert_exact(db)
        pin.cover_of = s.get(Board, 2)
        s.commit()
        assert_exact(db)
        pin.cover_of = None
        s.commit()
        assert_exact(db)
        s.delete(pin)
        s.commit()
    assert_exact(db)


def test_ordered_values_update(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([Pin(id=1, board_id=1, likes=1), Pin(id=2, board_id=1)])
        s.commit()
        stmt = sa.update(Pin).where(Pin.id == 1).ordered_values((Pin.board_id, 2), (Pin.likes, 7))
        s.execute(stmt)
        s.commit()
    assert cached(db, 2) == 1
    assert_exact(db)


def test_no_warning_for_ordinary_writes(db: sa.Engine) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CounterfillWarning)
        with Session(db) as s:
            s.add(Pin(board_id=1))
            s.commit()
            board = s.get(Board, 1)
            assert board is not None
            board.name = "plain"
            s.commit()
