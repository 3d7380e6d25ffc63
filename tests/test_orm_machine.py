"""Hypothesis state machines: inheritance, merges of stale parents and relationship moves."""

from __future__ import annotations

import warnings

import inheritance_models as im
import pin_models as pm
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from alembic_counterfill.errors import CounterfillWarning

PARENTS = 3


class _Machine(RuleBasedStateMachine):
    """Random ORM traffic on one database; every committed state equals the test's own truth."""

    url = ""
    base: type = im.Base
    parents: tuple[type, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.engine = sa.create_engine(self.url)
        self.base.metadata.drop_all(self.engine)
        self.base.metadata.create_all(self.engine)
        with Session(self.engine) as s:
            for cls in self.parents:
                s.add_all([cls(id=i) for i in range(1, PARENTS + 1)])
            s.commit()
        self.session = Session(self.engine)
        self.rows = 0

    def teardown(self) -> None:
        self.session.close()
        self.base.metadata.drop_all(self.engine)
        self.engine.dispose()

    def _commit(self) -> None:
        try:
            self.session.commit()
        except StaleDataError:
            self.session.rollback()

    def _pick(self, cls: type, index: int) -> object | None:
        ids = self.session.scalars(sa.select(cls.id).order_by(cls.id)).all()  # type: ignore[attr-defined]
        return self.session.get(cls, ids[index % len(ids)]) if ids else None


class InheritanceMachine(_Machine):
    base = im.Base
    parents = (im.Topic, im.Board)

    @rule(
        kind=st.sampled_from([im.Entry, im.Comment, im.Note]),
        parent=st.integers(1, PARENTS),
        flagged=st.booleans(),
        words=st.integers(0, 5),
    )
    def add_entry(self, kind: type, parent: int, flagged: bool, words: int) -> None:
        self.session.add(kind(topic_id=parent, flagged=flagged, words=words, score=words / 4))
        self._commit()

    @rule(
        kind=st.sampled_from([im.Item, im.Pin, im.Video]),
        parent=st.integers(1, PARENTS),
        hot=st.booleans(),
        origin=st.none() | st.integers(1, PARENTS),
    )
    def add_item(self, kind: type, parent: int, hot: bool, origin: int | None) -> None:
        extra: dict[str, object] = {"hot": hot, "origin_id": origin} if kind is im.Pin else {}
        if kind is im.Video:  # sum=/where= over the joined subclass's own columns
            extra = {"seconds": 59 + parent if hot else parent, "rating": 0.25 * parent}
        self.session.add(kind(board_id=parent, **extra))
        self._commit()

    @rule(
        base=st.sampled_from([im.Entry, im.Item]),
        index=st.integers(0, 50),
        parent=st.none() | st.integers(1, PARENTS),
        flip=st.booleans(),
    )
    def move(self, base: type, index: int, parent: int | None, flip: bool) -> None:
        obj = self._pick(base, index)
        if obj is None:
            return
        if isinstance(obj, im.Entry):
            obj.topic_id = parent
            if flip:
                obj.flagged = not obj.flagged
                obj.words += 1
                obj.score += 0.5
        else:
            obj.board_id = parent  # type: ignore[attr-defined]
            if flip and isinstance(obj, im.Pin):
                obj.hot = not obj.hot
                obj.origin_id = parent
            if flip and isinstance(obj, im.Video):
                obj.seconds = 0 if obj.seconds >= 60 else obj.seconds + 60
                obj.rating += 0.5
        self._commit()

    @rule(base=st.sampled_from([im.Entry, im.Item]), index=st.integers(0, 50))
    def delete(self, base: type, index: int) -> None:
        obj = self._pick(base, index)
        if obj is not None:
            self.session.delete(obj)
            self._commit()

    @rule(
        kind=st.sampled_from([im.Comment, im.Note]),
        parent=st.integers(1, PARENTS),
        dest=st.integers(1, PARENTS),
    )
    def bulk(self, kind: type, parent: int, dest: int) -> None:
        self.session.execute(sa.insert(kind), [{"topic_id": parent, "words": 2}])
        self.session.execute(sa.update(kind).where(kind.topic_id == parent).values(topic_id=dest))  # type: ignore[attr-defined]
        self._commit()

    @invariant()
    def exact(self) -> None:
        im.assert_exact(self.engine)


class PinMachine(_Machine):
    base = pm.Base
    parents = (pm.Board,)

    def __init__(self) -> None:
        super().__init__()
        self.detached: pm.Board | None = None

    @rule(parent=st.integers(1, PARENTS), likes=st.integers(0, 3))
    def add_pin(self, parent: int, likes: int) -> None:
        self.session.add(pm.Pin(board=self.session.get(pm.Board, parent), likes=likes))
        self._commit()

    @rule(
        index=st.integers(0, 50),
        dest=st.none() | st.integers(1, PARENTS),
        through=st.sampled_from(["relationship", "collection", "cover"]),
    )
    def move_by_relationship(self, index: int, dest: int | None, through: str) -> None:
        pin = self._pick(pm.Pin, index)
        if pin is None:
            return
        board = self.session.get(pm.Board, dest) if dest is not None else None
        if through == "relationship":
            pin.board = board  # type: ignore[attr-defined]
        elif through == "cover":
            pin.cover_of = board  # type: ignore[attr-defined]  # post_update
        elif board is not None:
            board.pins.append(pin)  # type: ignore[arg-type]
        elif pin.board is not None:  # type: ignore[attr-defined]
            pin.board.pins.remove(pin)  # type: ignore[attr-defined]
        self._commit()

    @rule(index=st.integers(0, 50))
    def delete_pin(self, index: int) -> None:
        pin = self._pick(pm.Pin, index)
        if pin is not None:
            self.session.delete(pin)
            self._commit()

    @rule(parent=st.integers(1, PARENTS))
    def detach_parent(self, parent: int) -> None:
        with Session(self.engine, expire_on_commit=False) as s:
            self.detached = s.get(pm.Board, parent)

    @rule(name=st.text("abc", max_size=3))
    def merge_stale_parent(self, name: str) -> None:
        if self.detached is None:
            return
        self.detached.name = name
        self.session.merge(self.detached)
        self._commit()

    @rule(parent=st.integers(1, PARENTS), value=st.integers(-5, 50))
    def assign_counter(self, parent: int, value: int) -> None:
        board = self.session.get(pm.Board, parent)
        assert board is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CounterfillWarning)
            board.pins_count = value
        self._commit()

    @invariant()
    def exact(self) -> None:
        pm.assert_exact(self.engine)


@pytest.mark.parametrize("machine", [InheritanceMachine, PinMachine])
def test_machine(machine: type, db_url: str) -> None:
    bound = type(machine.__name__, (machine,), {"url": db_url})
    run_state_machine_as_test(
        bound,
        settings=settings(
            max_examples=15,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
