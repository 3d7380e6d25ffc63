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

from . import association, sql
from . import deltas as _deltas
from .pause import is_paused
from .plan import Key, WritePlan, plan_for

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
    association.begin_flush(session)
    wanted: dict[WritePlan, set[Key]] = defaultdict(set)
    deleted = session.deleted
    for obj in (*session.dirty, *deleted):
        st: InstanceState[Any] = sa.inspect(obj)
        plan = plan_for(st.mapper)
        if plan is None or st.key is None:
            continue
        if obj in deleted or plan.may_change(st):
            wanted[plan].add(tuple(st.key[1]))
    for plan, keys in wanted.items():
        state.capture(session.connection(bind_arguments={"mapper": plan.mapper}), plan, keys)


def _old_key(target: Any) -> tuple[_FlushState, WritePlan, InstanceState[Any]] | None:
    st: InstanceState[Any] = sa.inspect(target)
    session = st.session
    stash = _stash(session) if session is not None else None
    plan = plan_for(st.mapper)
    if stash is None or plan is None or st.key is None:
        return None
    return stash, plan, st


def before_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row whose FK the unit of work itself changes."""
    # Rows changed during the flush itself (FKs synced from relationships) were
    # not visible in before_flush; read them here, one row at a time (rare).
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        if plan.may_change(st):
            stash.capture(connection, plan, {tuple(st.key[1])})


def before_delete(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row deleted during the flush (cascades) if not read yet."""
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        stash.capture(connection, plan, {tuple(st.key[1])})


def after_insert(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Note an inserted row: its state off the object, or its key to re-read."""
    st: InstanceState[Any] = sa.inspect(target)
    stash = _stash(st.session) if st.session is not None else None
    plan = plan_for(st.mapper)
    if stash is not None and plan is not None:
        row = plan.inserted_row(st)
        if row is not None:
            stash.inserted[plan].append(row)
        else:
            stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def after_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Note an updated row whose old state was read, to re-read it after the flush."""
    # Only rows whose old state was read can have moved a contribution; the
    # ORM calls this hook for every dirty object, even with no net change.
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        if tuple(st.key[1]) in stash.captured[plan]:
            stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def after_flush(session: Session, flush_context: UOWTransaction) -> None:
    """Read the new state, and apply new minus old per parent (association rows included)."""
    links = association.end_flush(session)
    stash = session.info.pop(_STASH, None)
    if stash is None:
        return
    deltas = links.deltas if links is not None else _deltas.new_deltas()
    plans = set(stash.captured) | set(stash.touched) | set(stash.inserted)
    for plan in plans:
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        _deltas.add_rows(deltas, plan, stash.old.get(plan, ()), -1)
        _deltas.add_rows(deltas, plan, stash.inserted.get(plan, ()), +1)
        keys = stash.captured.get(plan, set()) | stash.touched.get(plan, set())
        if keys:
            _deltas.add_rows(deltas, plan, _read(connection, plan, keys, lock=False), +1)
    if links is not None and links.recounts:
        # One key-ordered pass for deltas and recounts; the flush's end expires them all.
        _deltas.settle(session, deltas, links.recounts)
        _deltas.schedule_expiry(session, links.recounts)
    else:
        _deltas.apply(session, deltas)


def after_flush_postexec(session: Session, flush_context: UOWTransaction) -> None:
    """Expire the counters of loaded parents, so they read the new values."""
    _deltas.expire_now(session)


def discard(session: Session, *args: Any) -> None:
    """Forget this flush's state (the transaction rolled back)."""
    association.discard(session)
    session.info.pop(_STASH, None)
    _deltas.forget(session)
