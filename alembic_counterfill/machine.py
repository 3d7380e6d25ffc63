"""A Hypothesis state machine that drives random ORM traffic and checks counters after each commit.

Subclass :class:`CounterStateMachine`, set ``base`` and implement
``make_engine()``; override ``make_parent``/``make_child`` when your models
need more than their keys. See docs/testing.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy.orm import Session

from .consistency import assert_counters_consistent
from .counters import Counter, counters_of

_INDEX = st.integers(min_value=0, max_value=10_000)


def _sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class CounterStateMachine(RuleBasedStateMachine):
    """Random creates, moves, flips, deletes, flushes, commits and rollbacks over declared counters.

    After every commit (and at every step, for committed data seen from a fresh
    connection) each counter must equal its true COUNT/SUM. Two sessions are
    used so that writes from stale, expired objects are exercised too.
    """

    #: The declarative base (or MetaData) whose counters are exercised.
    base: ClassVar[Any] = None
    #: Create and drop all of ``base.metadata`` around each run.
    manage_schema: ClassVar[bool] = True

    def make_engine(self) -> sa.Engine:
        """Return an engine on an empty database of this run's own (subclasses implement)."""
        raise NotImplementedError("set base and implement make_engine() in your subclass")

    def make_parent(self, cls: type) -> Any:
        """Build a new parent object; override when the model needs more than defaults."""
        return cls()

    def make_child(self, cls: type, values: dict[str, Any]) -> Any:
        """Build a new child object from counted attributes; override to add required fields."""
        return cls(**values)

    # --- machinery -------------------------------------------------------------------------

    def __init__(self) -> None:
        super().__init__()
        self.engine = self.make_engine()
        if self.engine.dialect.name == "sqlite":
            # Enforce FKs as a server database would; otherwise deleting a parent
            # leaves orphans that a reused rowid silently re-adopts.
            sa.event.listen(self.engine, "connect", _sqlite_foreign_keys)
        self.metadata = getattr(self.base, "metadata", self.base)
        if self.manage_schema:
            self.metadata.drop_all(self.engine)
            self.metadata.create_all(self.engine)
        # Association-table counters have no child class to add or move rows of.
        self.counters: list[Counter] = [
            c for c in counters_of(self.base) if c.child_mapper is not None
        ]
        self.parents = sorted({c.parent_mapper for c in self.counters}, key=lambda m: str(m))
        self.children = sorted({c.child_mapper for c in self.counters}, key=lambda m: str(m))
        self.session = Session(self.engine)
        self.stale = Session(self.engine)

    def teardown(self) -> None:
        self.session.close()
        self.stale.close()
        if self.manage_schema:
            self.metadata.drop_all(self.engine)
        self.engine.dispose()

    def _pick(self, session: Session, mapper: Any, index: int) -> Any | None:
        pk = mapper.primary_key
        # Reads must not autoflush: a pending bad row should fail inside _guard, not here.
        with session.no_autoflush:
            count = session.scalar(sa.select(sa.func.count()).select_from(mapper.local_table))
            if not count:
                return None
            return session.scalars(
                sa.select(mapper.class_).order_by(*pk).offset(index % count).limit(1)
            ).first()

    def _parent_id(self, counter: Counter, index: int, session: Session) -> Any:
        parent = self._pick(session, counter.parent_mapper, index)
        if parent is None:
            return None
        return sa.inspect(parent).identity[0] if sa.inspect(parent).identity else None

    def _watched(self, counter: Counter) -> list[sa.Column[Any]]:
        return counter.value_columns()

    def _random_value(self, column: sa.Column[Any], data: st.DataObject) -> Any:
        if isinstance(column.type, sa.Boolean):
            return data.draw(st.booleans())
        if isinstance(column.type, sa.Integer | sa.Numeric):
            return data.draw(st.integers(min_value=-5, max_value=50))
        return None

    def _attr(self, mapper: Any, column: sa.Column[Any]) -> str:
        return str(mapper.get_property_by_column(column).key)

    def _session(self, stale: bool) -> Session:
        """The session for a write; the stale one first ends the main session's transaction.

        Both sessions run in this one thread: if the main session held row locks
        (or, on SQLite, the write lock) the stale one would wait on it forever.
        Two real requests would not share a thread, so the main "request"
        commits first, as sequential requests would.
        """
        if not stale:
            return self.session
        self._commit(self.session)
        return self.stale

    def _guard(self, session: Session, fn: Any) -> None:
        """Run one write; constraint violations (duplicate keys...) roll back like an app would."""
        try:
            fn()
            session.flush()
        except sa.exc.IntegrityError:
            session.rollback()

    # --- rules -----------------------------------------------------------------------------

    @rule(which=_INDEX)
    def add_parent(self, which: int) -> None:
        mapper = self.parents[which % len(self.parents)]
        self._guard(self.session, lambda: self.session.add(self.make_parent(mapper.class_)))

    @rule(which=_INDEX, parents=st.lists(_INDEX, min_size=1, max_size=3), data=st.data())
    def add_child(self, which: int, parents: list[int], data: st.DataObject) -> None:
        counter = self.counters[which % len(self.counters)]
        child = counter.child_mapper
        assert child is not None
        values: dict[str, Any] = {}
        # Set every FK of this child that feeds a counter, each to a random parent.
        for i, c in enumerate(x for x in self.counters if x.child_mapper is child):
            pid = self._parent_id(c, parents[i % len(parents)], self.session)
            if pid is None:
                return
            values[self._attr(child, c.fk)] = pid
            for col in self._watched(c):
                value = self._random_value(col, data)
                if value is not None:
                    values[self._attr(child, col)] = value
        self._guard(self.session, lambda: self.session.add(self.make_child(child.class_, values)))

    @rule(which=_INDEX, row=_INDEX, dest=_INDEX, stale=st.booleans())
    def move_child(self, which: int, row: int, dest: int, stale: bool) -> None:
        counter = self.counters[which % len(self.counters)]
        session = self._session(stale)
        obj = self._pick(session, counter.child_mapper, row)
        pid = self._parent_id(counter, dest, session)
        if obj is None:
            return
        if pid is None and not counter.fk.nullable:
            return
        attr = self._attr(counter.child_mapper, counter.fk)
        self._guard(session, lambda: setattr(obj, attr, pid))
        if stale:
            self._commit(session)

    @rule(which=_INDEX, row=_INDEX, stale=st.booleans(), data=st.data())
    def flip_child(self, which: int, row: int, stale: bool, data: st.DataObject) -> None:
        counter = self.counters[which % len(self.counters)]
        cols = self._watched(counter)
        session = self._session(stale)
        obj = self._pick(session, counter.child_mapper, row)
        if obj is None or not cols:
            return
        col = cols[data.draw(st.integers(0, len(cols) - 1))]
        value = self._random_value(col, data)
        attr = self._attr(counter.child_mapper, col)
        self._guard(session, lambda: setattr(obj, attr, value))
        if stale:
            self._commit(session)

    @rule(which=_INDEX, row=_INDEX, stale=st.booleans())
    def delete_child(self, which: int, row: int, stale: bool) -> None:
        counter = self.counters[which % len(self.counters)]
        session = self._session(stale)
        obj = self._pick(session, counter.child_mapper, row)
        if obj is None:
            return
        self._guard(session, lambda: session.delete(obj))
        if stale:
            self._commit(session)

    @rule()
    def load_stale(self) -> None:
        """Load every child into the second session, so later stale writes use old copies."""
        self._session(True)
        for mapper in self.children:
            assert mapper is not None
            self.stale.scalars(sa.select(mapper.class_).limit(50)).all()
        self.stale.commit()  # ends the transaction; objects stay in the identity map, expired

    @rule()
    def flush(self) -> None:
        self._guard(self.session, lambda: None)

    @rule()
    def commit(self) -> None:
        self._commit(self.session)

    @rule()
    def rollback(self) -> None:
        self.session.rollback()

    def _commit(self, session: Session) -> None:
        try:
            session.commit()
        except (sa.exc.IntegrityError, sa.orm.exc.StaleDataError):
            session.rollback()
        with self.engine.connect() as conn:
            assert_counters_consistent(conn, self.base)

    def committed_state_readable(self) -> bool:
        """Whether a fresh connection may read now (SQLite: not while a session writes).

        Use it to guard your own invariants that read committed data.
        """
        if getattr(self, "engine", None) is None:
            return False
        return self.engine.dialect.name != "sqlite" or not (
            self.session.in_transaction() or self.stale.in_transaction()
        )

    @invariant()
    def committed_counters_are_exact(self) -> None:
        # A fresh connection sees only committed data, which must always be exact.
        # (SQLite with an open writer is checked at each commit instead.)
        if self.committed_state_readable():
            with self.engine.connect() as conn:
                assert_counters_consistent(conn, self.base)
