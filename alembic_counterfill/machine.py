"""A Hypothesis state machine that drives random ORM traffic and checks counters after each commit.

Subclass :class:`CounterStateMachine`, set ``base`` and implement
``make_engine()``; override ``make_parent``/``make_child`` when your models
need more than their keys. Run it with ``MyMachine.TestCase`` or
:func:`run_counter_machine`: both fail when the run exercised too little
(see :mod:`.exercised`). See docs/testing.md.
"""

from __future__ import annotations

import unittest
import warnings
from functools import lru_cache
from typing import Any, ClassVar

import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session

from . import exercised as ex
from . import sql
from .consistency import assert_counters_consistent
from .counters import Counter, counters_of

_INDEX = st.integers(min_value=0, max_value=10_000)
#: What happens after a step's writes: mostly commits; rarely a rollback (which discards work).
_BETWEEN = st.sampled_from(
    ["commit", "commit", "commit", "nothing", "nothing", "flush", "load_stale", "add_parent"]
    + ["rollback"]
)


def _sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class CounterStateMachine(RuleBasedStateMachine):
    """Random creates, moves, flips, sum changes, deletes, commits and rollbacks over counters.

    Each example starts from seeded parents and children (it fails at once,
    naming the model, when none can be inserted). After every commit (and at
    every step, for committed data seen from a fresh connection) each counter
    must equal its true COUNT/SUM. A second session writes from stale, expired
    copies. Effects that reached a commit are tallied per counter, reported
    with Hypothesis ``event()``/``target()`` and checked at the end of the run.
    """

    #: The declarative base (or MetaData) whose counters are exercised.
    base: ClassVar[Any] = None
    #: Create and drop all of ``base.metadata`` around each run.
    manage_schema: ClassVar[bool] = True
    #: Rows seeded per parent model, and children per counter, at the start of each example.
    seed_parents: ClassVar[int] = 3
    seed_children: ClassVar[int] = 4
    #: Minimum mean per example of each applicable (counter, effect) pair over a run.
    min_per_example: ClassVar[float] = 1.0

    def make_engine(self) -> sa.Engine:
        """Return an engine on an empty database of this run's own (subclasses implement)."""
        raise NotImplementedError("set base and implement make_engine() in your subclass")

    def make_parent(self, cls: type) -> Any:
        """Build a new parent object; override when the model needs more than defaults."""
        return cls()

    def make_child(self, cls: type, values: dict[str, Any]) -> Any:
        """Build a new child object from counted attributes; override to add required fields."""
        return cls(**values)

    # --- the run's tally ---------------------------------------------------------------------

    @classmethod
    def exercised(cls) -> ex.Exercised:
        """This class's tally over the examples run so far (reset by each run)."""
        if "_exercised" not in cls.__dict__:
            cls._exercised = ex.Exercised()
        return cls.__dict__["_exercised"]

    @classmethod
    @lru_cache
    def _to_test_case(cls) -> Any:
        machine = cls

        class CounterMachineTestCase(unittest.TestCase):
            settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

            def runTest(self) -> None:
                run_counter_machine(machine, settings=self.settings)

        CounterMachineTestCase.__name__ = cls.__name__ + ".TestCase"
        return CounterMachineTestCase

    # --- machinery ---------------------------------------------------------------------------

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
        # No expiry on commit: the second session keeps old values, as a long-lived
        # object in an application would, so stale in-memory state is exercised.
        self.stale = Session(self.engine, expire_on_commit=False)
        # A session holds its unmodified objects weakly: without these references
        # they would be collected and re-loaded fresh, and no copy would ever be stale.
        self._stale_copies: dict[int, Any] = {}
        self.tally = ex.example_tally()
        self._pending: dict[int, list[tuple[str, str]]] = {id(self.session): [], id(self.stale): []}
        self.turn = -1
        self.last_error: BaseException | None = None
        self.exercised().require(self._required())
        self.exercised().kept_by_own_children.update(
            c.key for c in self.counters if c.child_mapper in self.parents
        )

    def _required(self) -> list[tuple[str, str]]:
        pairs = [("*", ex.STALE)]
        for c in self.counters:
            pairs += [(c.key, ex.INSERTED), (c.key, ex.NONZERO), (c.key, ex.MOVED)]
            pairs += [(c.key, ex.DELETED)]
            if self._writable(self._where(c)):
                pairs.append((c.key, ex.FLIPPED))
            if c.summed is not None and self._writable([c.summed]):
                pairs.append((c.key, ex.SUMMED))
        return pairs

    def teardown(self) -> None:
        try:
            self.exercised().add_example(self.tally)
            for (key, kind), n in sorted(self.tally.items()):
                event(f"{key} {kind}", ex.bucket(n))
            counted = {ex.MOVED, ex.FLIPPED, ex.SUMMED, ex.INSERTED, ex.DELETED}
            target(
                float(sum(n for (_, k), n in self.tally.items() if k in counted)), label="writes"
            )
        finally:
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
            obj = session.scalars(
                sa.select(mapper.class_).order_by(*pk).offset(index % count).limit(1)
            ).first()
        if session is self.stale and obj is not None:
            self._hold(obj)
        return obj

    def _hold(self, obj: Any) -> None:
        """Keep a stale copy alive, unless a counted FK is part of its key.

        A copy whose key another session moved would stand for a row that is
        gone, and clash with the row that takes its key.
        """
        mapper = sa.inspect(obj).mapper
        key = set(mapper.primary_key)
        if not any(c.fk in key for c in self.counters if c.child_mapper is mapper):
            self._stale_copies[id(obj)] = obj

    def _parent_id(self, counter: Counter, index: int, session: Session) -> Any:
        parent = self._pick(session, counter.parent_mapper, index)
        if parent is None:
            return None
        return sa.inspect(parent).identity[0] if sa.inspect(parent).identity else None

    def _all_parent_ids(self, counter: Counter, session: Session) -> list[Any]:
        with session.no_autoflush:
            return list(session.scalars(sa.select(counter.parent_pk).order_by(counter.parent_pk)))

    def _where(self, counter: Counter) -> list[sa.Column[Any]]:
        return [c for c in self._watched(counter) if c is not counter.summed]

    def _watched(self, counter: Counter) -> list[sa.Column[Any]]:
        return list(dict.fromkeys(counter.value_columns()))  # a column may appear twice

    def _writable(self, columns: list[sa.Column[Any]]) -> bool:
        return any(isinstance(c.type, sa.Boolean | sa.Integer | sa.Numeric) for c in columns)

    def _random_value(self, column: sa.Column[Any], data: st.DataObject) -> Any:
        if isinstance(column.type, sa.Boolean):
            return data.draw(st.booleans())
        if isinstance(column.type, sa.Integer | sa.Numeric):
            return data.draw(st.integers(min_value=-5, max_value=50))
        return None

    def _other_value(self, column: sa.Column[Any], current: Any, data: st.DataObject) -> Any:
        """A value of ``column`` different from ``current`` (so the write changes something)."""
        if isinstance(column.type, sa.Boolean):
            return not current
        if isinstance(column.type, sa.Integer | sa.Numeric):
            return (current or 0) + data.draw(st.sampled_from([1, 2, 5, -1, -3]))
        return None

    def _attr(self, mapper: Any, column: sa.Column[Any]) -> str:
        return str(mapper.get_property_by_column(column).key)

    def _states(self, session: Session, mapper: Any, pk: Any) -> dict[str, tuple[Any, ...] | None]:
        """Each counter's view of one child row, read from the database: (fk, where, summed)."""
        mine = [c for c in self.counters if c.child_mapper is mapper]
        if not mine:  # a parent that is no counter's child
            return {}
        cols: list[Any] = []
        for c in mine:
            where = sa.case((c.where, 1), else_=0) if c.where is not None else sa.literal(1)
            cols += [c.fk, where, c.summed_value if c.summed is not None else sa.literal(0)]
        key_cols = mapper.primary_key
        cond = sa.and_(*(col == v for col, v in zip(key_cols, pk, strict=True)))
        with session.no_autoflush:
            row = session.execute(sa.select(*cols).select_from(mapper.local_table).where(cond))
            found = row.first()
        return {
            c.key: (tuple(found[3 * i : 3 * i + 3]) if found is not None else None)
            for i, c in enumerate(mine)
        }

    def _note(self, session: Session, changes: list[tuple[str, str]]) -> None:
        self._pending[id(session)].extend(changes)
        if changes and session is self.stale:
            self._pending[id(session)].append(("*", ex.STALE))

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

    def _guard(self, session: Session, fn: Any) -> bool:
        """Run one write; constraint violations (duplicate keys...) roll back like an app would."""
        try:
            fn()
            session.flush()
            return True
        except sa.exc.IntegrityError as exc:
            self.last_error = exc
            self._rollback(session)
            return False

    def _write(self, session: Session, obj: Any, fn: Any) -> None:
        """Run ``fn`` (a change to ``obj``) and note its effects as the database saw them."""
        state = sa.inspect(obj)
        pk = state.identity
        before = self._states(session, state.mapper, pk) if pk else {}
        if self._guard(session, fn) and pk:
            # A write to a primary-key column (a move of an association row) changes the identity.
            after = self._states(session, state.mapper, state.identity or pk)
            self._note(session, [e for k in after for e in ex.effects(k, before[k], after[k])])

    def _insert(self, session: Session, obj: Any) -> bool:
        with warnings.catch_warnings():
            # Duplicate natural keys are drawn on purpose: the database refuses the
            # row, and a refused flush must leave every counter as it was. SQLAlchemy
            # warns first when the session already holds the key; that is expected here.
            warnings.filterwarnings(
                "ignore", r"New instance .* conflicts with persistent instance", sa.exc.SAWarning
            )
            if not self._guard(session, lambda: session.add(obj)):
                return False
        state = sa.inspect(obj)
        after = self._states(session, state.mapper, state.identity)
        self._note(session, [e for k in after for e in ex.effects(k, None, after[k])])
        return True

    def _child_values(self, child: Any, parents: list[int], data: st.DataObject) -> dict | None:
        values: dict[str, Any] = {}
        # Set every FK of this child that feeds a counter, each to a random parent.
        for i, c in enumerate(x for x in self.counters if x.child_mapper is child):
            pid = self._parent_id(c, parents[i % len(parents)], self.session)
            if pid is None:
                return None
            values[self._attr(child, c.fk)] = pid
            for col in self._watched(c):
                value = self._random_value(col, data)
                if value is not None:
                    values[self._attr(child, col)] = value
        return values

    # --- seeding -----------------------------------------------------------------------------

    @initialize(data=st.data())
    def seed(self, data: st.DataObject) -> None:
        """Insert parents and counted children, or fail naming what cannot be inserted."""
        # One commit per row: a failing insert (a duplicate key) loses only itself.
        # The counters are checked once, at the end (the seed is not what is tested).
        for mapper in self.parents:
            for _ in range(self.seed_parents):
                self._insert(self.session, self.make_parent(mapper.class_))
                self._commit(self.session, check=False)
            self._require_rows(mapper, "make_parent(cls)")
        for counter in self.counters:
            for i in range(self.seed_children):
                values = self._child_values(counter.child_mapper, [i, 2 * i + 1], data)
                if values is not None:
                    assert counter.child_mapper is not None  # association counters are left out
                    self._insert(self.session, self.make_child(counter.child_mapper.class_, values))
                    self._commit(self.session, check=False)
            self._require_rows(counter.child_mapper, "make_child(cls, values)")
        with self.engine.connect() as conn:
            assert_counters_consistent(conn, self.base)

    def _require_rows(self, mapper: Any, hook: str) -> None:
        with self.engine.connect() as conn:
            n = conn.scalar(sa.select(sa.func.count()).select_from(mapper.local_table))
        if not n:
            error = self.last_error
            why = f": {getattr(error, 'orig', error)}" if error is not None else ""
            raise AssertionError(
                f"CounterStateMachine could not insert any {mapper.class_.__name__} row"
                f"{why}; override {hook} in {type(self).__name__} to fill the columns "
                f"{mapper.class_.__name__} requires"
            )

    # --- rules -------------------------------------------------------------------------------

    def add_parent(self, which: int) -> None:
        mapper = self.parents[which % len(self.parents)]
        self._insert(self.session, self.make_parent(mapper.class_))

    def add_child(self, which: int, parents: list[int], data: st.DataObject) -> None:
        child = self.counters[which % len(self.counters)].child_mapper
        values = self._child_values(child, parents, data)
        if values is not None:
            assert child is not None  # association counters are left out
            self._insert(self.session, self.make_child(child.class_, values))

    def _in(self, stale: bool, fn: Any, *args: Any) -> None:
        """Run a write rule in the main or the stale session; the stale one commits at once."""
        session = self._session(stale)
        try:
            fn(session, *args)
        finally:
            if stale:
                self._commit(session)

    def _move(
        self, session: Session, which: int, row: int, dest: int, obj: Any | None = None
    ) -> None:
        counter = self.counters[which % len(self.counters)]
        obj = obj if obj is not None else self._pick(session, counter.child_mapper, row)
        if obj is None:
            return
        current = self._states(session, counter.child_mapper, sa.inspect(obj).identity)
        now = (current[counter.key] or (None,))[0]
        attr = self._attr(counter.child_mapper, counter.fk)
        held = getattr(obj, attr)  # differs from `now` when the copy is stale
        # Always somewhere else: a move to the parent the row already has tests nothing.
        ids = self._all_parent_ids(counter, session)
        choices: list[Any] = [p for p in ids if p not in (now, held)]
        if counter.fk.nullable and now is not None:
            choices.append(None)
        if not choices:
            return
        pid = choices[dest % len(choices)]
        self._write(session, obj, lambda: setattr(obj, attr, pid))

    def _change(self, session: Session, which: int, row: int, data: st.DataObject) -> None:
        columns = self._changeable()
        counter, col = columns[which % len(columns)]
        obj = self._pick(session, counter.child_mapper, row)
        if obj is None:
            return
        attr = self._attr(counter.child_mapper, col)
        if session is self.stale:
            # Differ from the stale copy, so the flush writes whatever the row holds now.
            current = getattr(obj, attr)
        else:
            with session.no_autoflush:
                mapper = counter.child_mapper
                pk = sa.inspect(obj).identity
                assert mapper is not None  # association counters are left out
                cond = sa.and_(*(k == v for k, v in zip(mapper.primary_key, pk, strict=True)))
                current = session.scalar(sa.select(col).select_from(mapper.local_table).where(cond))
        value = self._other_value(col, current, data)
        self._write(session, obj, lambda: setattr(obj, attr, value))

    def _move_behind_stale(self, which: int, row: int, dest: int) -> None:
        """The stale session loads a row, the main session moves it, then the stale copy moves.

        The stale copy's flush must take the old parent from the database (the
        main session's move), not from the copy. When the counter's column is
        part of the child's key (a moved key would orphan the copy), this is a
        plain move from the stale session.
        """
        counter = self.counters[which % len(self.counters)]
        mapper = counter.child_mapper
        if mapper is None or counter.fk in set(mapper.primary_key):
            self._in(True, self._move, which, row, dest)
            return
        copy = self._pick(self._session(True), mapper, row)
        self.stale.commit()  # end the read (SQLite's lock); the copy keeps its values
        if copy is None:
            return
        main = self.session.get(mapper.class_, sa.inspect(copy).identity)
        self._move(self.session, which, row, dest, main)
        self._commit(self.session)
        self._in(True, self._move, which, row, dest + 1, copy)

    def _changeable(self) -> list[tuple[Counter, Any]]:
        """(counter, column) pairs of every writable ``where=`` and ``sum=`` column."""
        return [
            (c, col) for c in self.counters for col in self._watched(c) if self._writable([col])
        ]

    def _delete(self, session: Session, which: int, row: int) -> None:
        counter = self.counters[which % len(self.counters)]
        obj = self._pick(session, counter.child_mapper, row)
        if obj is not None:
            self._write(session, obj, lambda: session.delete(obj))

    #: The write actions, taken in turn (see :meth:`step`).
    WRITES: ClassVar[tuple[str, ...]] = (
        "add_child",
        "move",
        "change",
        "delete",
        "move_behind_stale",
        "change_stale",
        "add_child",
        "delete_stale",
    )

    @rule(skip=st.integers(0, 2), times=st.integers(1, 3), then=_BETWEEN, data=st.data())
    def step(self, skip: int, times: int, then: str, data: st.DataObject) -> None:
        """A few writes (inserts, moves, where=/sum= changes, deletes), then commit or the like.

        Hypothesis draws rules unevenly, and a run only proves something when
        every kind of write happens often: so every step writes, actions and
        counters come up in turn (``skip`` varies the order), and the random
        parts are the rows, the parents, the values and what happens between.
        """
        self.turn += skip
        for _ in range(times):
            self.turn += 1
            # (action, counter) pairs in turn: every pair comes up once per cycle.
            pair = self.turn % (len(self.WRITES) * len(self.counters))
            which, action = divmod(pair, len(self.WRITES))
            row, dest = data.draw(_INDEX), data.draw(_INDEX)
            self._one_write(self.WRITES[action], which, row, dest, data)
        self._between(then, data.draw(_INDEX))

    def _one_write(self, action: str, which: int, row: int, dest: int, data: Any) -> None:
        stale = action.endswith("_stale")
        if action == "add_child":
            self.add_child(which, [row, dest], data)
        elif action == "move_behind_stale":
            self._move_behind_stale(which, row, dest)
        elif action.startswith("move"):
            self._in(stale, self._move, which, row, dest)
        elif action.startswith("change") and self._changeable():
            self._in(stale, self._change, which, row, data)
        elif action.startswith("delete"):
            self._in(stale, self._delete, which, row)

    def load_stale(self) -> None:
        """Load every child into the second session, so later stale writes use old copies."""
        self._session(True)
        for mapper in self.children:
            assert mapper is not None  # association counters are left out
            for obj in self.stale.scalars(sa.select(mapper.class_).limit(50)):
                self._hold(obj)
        self.stale.commit()  # ends the transaction; the copies keep their values (no expiry)

    def _between(self, action: str, which: int) -> None:
        """Commit, flush, roll back, add a parent or load stale copies into the second session."""
        if action == "commit":
            if not self._pending[id(self.session)]:
                self.tally[("*", ex.EMPTY_COMMIT)] += 1
            self._commit(self.session)
        elif action == "flush":
            self._guard(self.session, lambda: None)
        elif action == "load_stale":
            self.load_stale()
        elif action == "add_parent":
            self.add_parent(which)
        elif action == "rollback":
            self._rollback(self.session)

    def _rollback(self, session: Session) -> None:
        if self._pending[id(session)]:
            self.tally[("*", ex.ROLLED_BACK)] += 1
        self._pending[id(session)] = []
        session.rollback()

    def _commit(self, session: Session, check: bool = True) -> None:
        try:
            session.commit()
        except (sa.exc.IntegrityError, sa.orm.exc.StaleDataError) as exc:
            self.last_error = exc
            self._rollback(session)
        done, self._pending[id(session)] = self._pending[id(session)], []
        self.tally.update(done)
        if not check:
            return
        with self.engine.connect() as conn:
            assert_counters_consistent(conn, self.base)
            for c in self.counters:
                nonzero = sa.select(sa.func.count()).select_from(c.parent_table)
                # cached_value: the column, plus pending deltas for buffered counters
                if conn.scalar(nonzero.where(sql.cached_value(c) != 0)):
                    self.tally[(c.key, ex.NONZERO)] += 1

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


def run_counter_machine(
    machine: type[CounterStateMachine], *, settings: settings | None = None
) -> ex.Exercised:
    """Run ``machine`` as a test, then fail unless it exercised every counter enough.

    :param settings: Hypothesis settings (default: the current profile, no deadline).
    :returns: the run's :class:`~.exercised.Exercised` tally (``.report()`` prints it).
    """
    machine._exercised = ex.Exercised()
    run_state_machine_as_test(machine, settings=settings)
    tally = machine.exercised()
    tally.check(machine.min_per_example)
    return tally
