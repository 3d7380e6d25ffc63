"""The library's Hypothesis state machine over random ORM traffic, checked against its own truth.

After every commit the machine checks counters with the drift helper; this test
adds a second, independent check with the test's own GROUP BY queries.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import settings
from social import Base, SocialMachine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache
from alembic_counterfill import exercised as ex
from alembic_counterfill.testing import CounterStateMachine, run_counter_machine


def test_random_orm_traffic_keeps_counters_exact(run_machine) -> None:  # noqa: ANN001
    run_machine(SocialMachine, max_examples=10)


def test_machine_requires_make_engine() -> None:
    class Incomplete(CounterStateMachine):
        base = Base

    with pytest.raises(NotImplementedError, match="make_engine"):
        Incomplete()


class NotesBase(DeclarativeBase):
    pass


class Board(NotesBase):
    __tablename__ = "boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    notes_count: Mapped[int] = counter_cache("Note.board_id")


class Note(NotesBase):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    board_id: Mapped[int] = mapped_column(sa.ForeignKey("boards.id"))
    title: Mapped[str] = mapped_column(sa.String(20))  # NOT NULL, no default


def test_machine_fails_when_it_cannot_insert_children(sqlite_url: str) -> None:
    """A new user's first try: NOT NULL columns and no make_child() must not pass as '1 passed'."""

    class Notes(CounterStateMachine):
        base = NotesBase

        def make_engine(self) -> sa.Engine:
            return sa.create_engine(sqlite_url)

    with pytest.raises(AssertionError) as err:
        run_counter_machine(Notes, settings=settings(max_examples=3, stateful_step_count=5))
    msg = str(err.value)
    assert "could not insert any Note row" in msg and "NOT NULL" in msg
    assert "override make_child(cls, values) in Notes" in msg


def test_machine_with_make_child_exercises_every_kind(sqlite_url: str) -> None:
    class Notes(CounterStateMachine):
        base = NotesBase

        def make_engine(self) -> sa.Engine:
            return sa.create_engine(sqlite_url)

        def make_child(self, cls: type, values: dict[str, Any]) -> Any:
            return cls(title="hi", **values)

    tally = run_counter_machine(Notes, settings=settings(max_examples=3, stateful_step_count=20))
    for kind in (ex.INSERTED, ex.MOVED, ex.DELETED, ex.NONZERO):
        assert tally.totals[("boards.notes_count", kind)] > 0, tally.report()


def test_exercise_check_names_what_is_missing() -> None:
    tally = ex.Exercised()
    tally.require([("users.posts_count", ex.FLIPPED), ("users.posts_count", ex.MOVED)])
    tally.add_example({("users.posts_count", ex.MOVED): 3})
    tally.add_example({("users.posts_count", ex.MOVED): 1})
    with pytest.raises(AssertionError) as err:
        tally.check()
    lines = str(err.value).splitlines()
    assert lines[0] == "the state machine exercised too little to prove anything:"
    assert lines[1].startswith("  users.posts_count flipped: 0, need 2 (the where= column")
    assert "users.posts_count moved: 4 (2.0 per example)" in str(err.value)
    tally.check(per_example=0)  # nothing demanded: passes
