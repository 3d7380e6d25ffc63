"""Flush handler: turn each ORM flush into atomic counter deltas in the same transaction.

Protocol (docs/increment-logic.md): before the flush writes, the old state of
every touched child row (parent key and contribution per counter) is read from
the database under ``FOR UPDATE``; after it writes, the new state is read the
same way; the delta per parent is new minus old, coalesced and applied once per
parent table in primary-key order. Reading the database, not the session's
copy, keeps counters exact with expired or stale objects and arbitrary
``where=`` expressions. :mod:`.events` registers these handlers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, Session, UOWTransaction
from sqlalchemy.orm.state import InstanceState

from . import deltas as _deltas
from . import sql, sqlite_lock
from .pause import is_paused
from .plan import Key, WritePlan, plans_for

_STASH = "counterfill.flush"


def _read(connection: sa.Connection, plan: WritePlan, keys: set[Key], *, lock: bool) -> list[Any]:
    dialect = connection.dialect.name
    where = sql.keys_in(plan.pk_columns, keys, dialect)
    stmt = sql.matching_state(plan.counters, plan.pk_columns, where, lock=lock)
    return list(connection.execute(stmt).all())


@dataclass(eq=False)
class _FlushState:
    """Old rows read before the flush and keys to re-read after it, per plan."""

    old: dict[WritePlan, list[Any]] = field(default_factory=lambda: defaultdict(list))
    captured: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    touched: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    inserted: dict[WritePlan, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def capture(self, connection: sa.Connection, plan: WritePlan, keys: set[Key]) -> None:
        keys = keys - self.captured[plan]
        if not keys:
            return
        self.captured[plan] |= keys
        sqlite_lock.begin_write(connection)  # several SQLite writers: read under the lock
        self.old[plan].extend(_read(connection, plan, keys, lock=True))


def _stash(session: Session) -> _FlushState | None:
    return session.info.get(_STASH)


def before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    """Read (and lock) the old state of the deleted and relevantly dirty children."""
    session.info.pop(_STASH, None)
    if is_paused():
        return
    state = _FlushState()
    session.info[_STASH] = state
    wanted: dict[WritePlan, set[Key]] = defaultdict(set)
    deleted = session.deleted
    for obj in (*session.dirty, *deleted):
        st: InstanceState[Any] = sa.inspect(obj)
        if st.key is None:
            continue
        for plan in plans_for(st.mapper):
            if obj in deleted or plan.may_change(st):
                wanted[plan].add(tuple(st.key[1]))
        for child in _collection_changes(st):
            for plan in plans_for(child.mapper):
                wanted[plan].add(tuple(child.key[1]))  # type: ignore[index]
    for plan, keys in sorted(wanted.items(), key=lambda kv: kv[0].table.name):
        state.capture(session.connection(bind_arguments={"mapper": plan.mapper}), plan, keys)


def _collection_changes(st: InstanceState[Any]) -> list[InstanceState[Any]]:
    """Persistent children added to or removed from ``st``'s one-to-many collections.

    The unit of work sets their FK during the flush; reading their old state
    here keeps moves through a collection (``board.pins.append(pin)``) to one
    statement per child table, like FK moves. Unloaded collections are not
    loaded (their history is empty).
    """
    out: list[InstanceState[Any]] = []
    for rel in st.mapper.relationships:
        if rel.direction.name != "ONETOMANY" or not plans_for(rel.mapper):
            continue
        hist = st.attrs[rel.key].history
        for child in (*hist.added, *hist.deleted):
            child_state: InstanceState[Any] = sa.inspect(child)
            if child_state.key is not None:
                out.append(child_state)
    return out


def _found(target: Any) -> tuple[_FlushState, list[WritePlan], InstanceState[Any]] | None:
    st: InstanceState[Any] = sa.inspect(target)
    session = st.session
    stash = _stash(session) if session is not None else None
    plans = plans_for(st.mapper)
    if stash is None or not plans or st.key is None:
        return None
    return stash, plans, st


def before_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row whose FK the unit of work itself changes."""
    # Rows changed during the flush in ways before_flush could not see (an FK
    # synced from a relationship without a backref) are read here, one row at
    # a time (rare).
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            if plan.may_change(st):
                stash.capture(connection, plan, {tuple(st.key[1])})


def before_delete(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row deleted during the flush (cascades) if not read yet."""
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            stash.capture(connection, plan, {tuple(st.key[1])})


def after_insert(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Note an inserted row: its state off the object, or its key to re-read."""
    st: InstanceState[Any] = sa.inspect(target)
    stash = _stash(st.session) if st.session is not None else None
    if stash is None:
        return
    for plan in plans_for(st.mapper):
        row = plan.inserted_row(st)
        if row is not None:
            stash.inserted[plan].append(row)
        else:
            stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def after_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Note an updated row whose old state was read, to re-read it after the flush."""
    # Only rows whose old state was read can have moved a contribution; the
    # ORM calls this hook for every dirty object, even with no net change.
    # (Rows read before the flush are re-read after it in any case; this adds
    # their new key when the primary key itself changed.)
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            if tuple(st.key[1]) in stash.captured[plan]:
                stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def after_flush(session: Session, flush_context: UOWTransaction) -> None:
    """Read the new state, and apply new minus old per parent."""
    stash = session.info.pop(_STASH, None)
    if stash is None:
        return
    deltas = _deltas.new_deltas()
    plans = set(stash.captured) | set(stash.touched) | set(stash.inserted)
    for plan in plans:
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        _deltas.add_rows(deltas, plan, stash.old.get(plan, ()), -1)
        _deltas.add_rows(deltas, plan, stash.inserted.get(plan, ()), +1)
        keys = stash.captured.get(plan, set()) | stash.touched.get(plan, set())
        if keys:
            _deltas.add_rows(deltas, plan, _read(connection, plan, keys, lock=False), +1)
    _deltas.apply(session, deltas)


def after_flush_postexec(session: Session, flush_context: UOWTransaction) -> None:
    """Expire the counters of loaded parents, so they read the new values."""
    _deltas.expire_now(session)


def discard(session: Session, *args: Any) -> None:
    """Forget this flush's state (the transaction rolled back)."""
    session.info.pop(_STASH, None)
    _deltas.forget(session)
