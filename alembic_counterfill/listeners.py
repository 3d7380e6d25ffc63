"""Live maintenance: turn each ORM flush into atomic counter deltas in the same transaction.

Protocol (docs/increment-logic.md): before the flush writes, the old state of
every touched child row (parent key and contribution per counter) is read from
the database under ``FOR UPDATE``; after it writes, the new state is read the
same way; the delta per parent is new minus old, coalesced and applied once per
parent table in primary-key order. Reading the database, not the session's
copy, keeps counters exact with expired or stale objects and arbitrary
``where=`` expressions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session, UOWTransaction
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql import visitors

from . import secondary, sql
from .counters import Counter, counters_of_child
from .pause import is_paused

_STASH = "counterfill.flush"
_EXPIRE = "counterfill.expire"

Key = tuple[Any, ...]


@dataclass(eq=False)
class _Plan:
    """How to read one child table's contribution to its counters."""

    mapper: Mapper[Any]
    table: sa.Table
    counters: list[Counter]
    pk_columns: list[sa.Column[Any]]
    # Attribute keys whose change can move a contribution; None means "any change may".
    watched: frozenset[str] | None
    # Per counter (fk attribute, summed attribute or None) when every counter's
    # contribution can be read off an inserted object; None when a where= needs SQL.
    direct: list[tuple[str, str | None, type]] | None

    def inserted_row(self, state: InstanceState[Any]) -> tuple[Any, ...] | None:
        """The (k0, v0, k1, v1 ...) row of a just-inserted object, or None to re-read it."""
        if self.direct is None:
            return None
        row: list[Any] = []
        values = state.dict
        for fk_attr, sum_attr, fk_type in self.direct:
            if fk_attr not in values or (sum_attr is not None and sum_attr not in values):
                return None  # server-side default: only the database knows the value
            parent = values[fk_attr]
            if parent is not None and not isinstance(parent, fk_type):
                return None  # the database will coerce it; let it tell us the result
            row.append(parent)
            row.append(1 if sum_attr is None else (values[sum_attr] or 0))
        return tuple(row)

    def may_change(self, state: InstanceState[Any]) -> bool:
        if self.watched is None:
            return True
        attrs = state.attrs
        return any(attrs[k].history.has_changes() for k in self.watched)


_plans: dict[Mapper[Any], _Plan | None] = {}


def _watched(
    mapper: Mapper[Any], table: sa.Table, counters: list[Counter]
) -> frozenset[str] | None:
    columns: set[sa.Column[Any]] = set()
    for c in counters:
        columns.add(c.fk)
        if c.summed is not None:
            columns.add(c.summed)
        if c.where is not None:
            for el in visitors.iterate(c.where):
                if isinstance(el, sa.Column):
                    if el.table is not table:
                        return None  # depends on another table: any write may matter
                    columns.add(el)
    keys = set()
    for col in columns:
        try:
            keys.add(mapper.get_property_by_column(col).key)
        except Exception:  # unmapped column: cannot watch it, so watch everything
            return None
    return frozenset(keys)


def _direct(
    mapper: Mapper[Any], counters: list[Counter]
) -> list[tuple[str, str | None, type]] | None:
    out: list[tuple[str, str | None, type]] = []
    for c in counters:
        if c.where is not None:
            return None
        try:
            fk_type = c.fk.type.python_type
            fk_attr = mapper.get_property_by_column(c.fk).key
            sum_attr = None if c.summed is None else mapper.get_property_by_column(c.summed).key
        except Exception:  # no python_type, or an unmapped column: re-read from the database
            return None
        out.append((fk_attr, sum_attr, fk_type))
    return out


def plan_for(mapper: Mapper[Any]) -> _Plan | None:
    """The read plan for rows of ``mapper``, or ``None`` when it feeds no counter."""
    if mapper in _plans:
        return _plans[mapper]
    counters = counters_of_child(mapper)
    plan = None
    if counters:
        table = counters[0].child_table
        counters = [c for c in counters if c.child_table is table]
        pk_columns = [c for c in mapper.primary_key if isinstance(c, sa.Column)]
        plan = _Plan(
            mapper,
            table,
            counters,
            pk_columns,
            _watched(mapper, table, counters),
            _direct(mapper, counters),
        )
    _plans[mapper] = plan
    return plan


@dataclass(eq=False)
class _FlushState:
    """Old rows read before the flush and keys to re-read after it, per plan."""

    old: dict[_Plan, list[Any]] = field(default_factory=lambda: defaultdict(list))
    captured: dict[_Plan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    touched: dict[_Plan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    inserted: dict[_Plan, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def capture(self, connection: sa.Connection, plan: _Plan, keys: set[Key]) -> None:
        keys = keys - self.captured[plan]
        if not keys:
            return
        self.captured[plan] |= keys
        dialect = connection.dialect.name
        stmt = sql.child_state(plan.counters, plan.pk_columns, keys, lock=True, dialect=dialect)
        self.old[plan].extend(connection.execute(stmt).all())


def _stash(session: Session) -> _FlushState | None:
    return session.info.get(_STASH)


def _before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    session.info.pop(_STASH, None)
    if is_paused():
        return
    state = _FlushState()
    session.info[_STASH] = state
    secondary.begin_flush(session)
    wanted: dict[_Plan, set[Key]] = defaultdict(set)
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


def _old_key(target: Any) -> tuple[_FlushState, _Plan, InstanceState[Any]] | None:
    st: InstanceState[Any] = sa.inspect(target)
    session = st.session
    stash = _stash(session) if session is not None else None
    plan = plan_for(st.mapper)
    if stash is None or plan is None or st.key is None:
        return None
    return stash, plan, st


def _before_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    # Rows changed during the flush itself (FKs synced from relationships) were
    # not visible in before_flush; read them here, one row at a time (rare).
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        if plan.may_change(st):
            stash.capture(connection, plan, {tuple(st.key[1])})


def _before_delete(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        stash.capture(connection, plan, {tuple(st.key[1])})


def _after_insert(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    st: InstanceState[Any] = sa.inspect(target)
    stash = _stash(st.session) if st.session is not None else None
    plan = plan_for(st.mapper)
    if stash is not None and plan is not None:
        row = plan.inserted_row(st)
        if row is not None:
            stash.inserted[plan].append(row)
        else:
            stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def _after_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    # Only rows whose old state was read can have moved a contribution; the
    # ORM calls this hook for every dirty object, even with no net change.
    found = _old_key(target)
    if found:
        stash, plan, st = found
        assert st.key is not None
        if tuple(st.key[1]) in stash.captured[plan]:
            stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def _after_flush(session: Session, flush_context: UOWTransaction) -> None:
    captured = secondary.end_flush(session)
    stash = session.info.pop(_STASH, None)
    if stash is None:
        return
    deltas: dict[Any, dict[Any, dict[Counter, Any]]] = (
        captured.deltas
        if captured is not None
        else defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    )
    plans = set(stash.captured) | set(stash.touched) | set(stash.inserted)
    for plan in plans:
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        _add(deltas, plan, stash.old.get(plan, ()), -1)
        _add(deltas, plan, stash.inserted.get(plan, ()), +1)
        keys = stash.captured.get(plan, set()) | stash.touched.get(plan, set())
        if keys:
            dialect = connection.dialect.name
            stmt = sql.child_state(
                plan.counters, plan.pk_columns, keys, lock=False, dialect=dialect
            )
            _add(deltas, plan, connection.execute(stmt).all(), +1)
    if captured is not None and captured.recounts:
        from .bulk import settle

        settle(session, deltas, captured.recounts)
        # settle() leaves expiry to the flush's end: schedule the recounted parents too.
        expire = session.info.setdefault(_EXPIRE, defaultdict(set))
        for counter, ids in captured.recounts.items():
            for pid in ids:
                expire[(counter.parent_mapper, pid)].add(counter.attr_key)
    else:
        apply(session, deltas)


def _add(deltas: Any, plan: _Plan, rows: Any, sign: int) -> None:
    for row in rows:
        for i, counter in enumerate(plan.counters):
            parent_id, value = row[2 * i], row[2 * i + 1]
            if parent_id is not None and value:
                deltas[counter.parent_mapper][parent_id][counter] += sign * value


def apply(session: Session, deltas: dict[Any, dict[Any, dict[Counter, Any]]]) -> None:
    """Apply per-parent deltas (``{parent_mapper: {id: {counter: d}}}``) and schedule expiry.

    Parent tables are visited in name order and parents in key order, so two
    transactions always lock in the same order.
    """
    expire = session.info.setdefault(_EXPIRE, defaultdict(set))
    for parent_mapper in sorted(deltas, key=lambda m: m.local_table.name):
        per_parent = {
            pid: {c.column: d for c, d in ds.items() if d}
            for pid, ds in deltas[parent_mapper].items()
        }
        per_parent = {pid: ds for pid, ds in per_parent.items() if ds}
        if not per_parent:
            continue
        any_counter = next(iter(next(iter(deltas[parent_mapper].values()))))
        connection = session.connection(bind_arguments={"mapper": parent_mapper})
        sql.apply_deltas(connection, any_counter.parent_table, any_counter.parent_pk, per_parent)
        for pid, ds in deltas[parent_mapper].items():
            expire[(parent_mapper, pid)].update(c.attr_key for c in ds)


def _after_flush_postexec(session: Session, flush_context: UOWTransaction) -> None:
    expire = session.info.pop(_EXPIRE, None)
    if not expire:
        return
    identity_map = session.identity_map
    for (mapper, pid), attrs in expire.items():
        obj = identity_map.get(mapper.identity_key_from_primary_key((pid,)))
        if obj is not None:
            session.expire(obj, list(attrs))


def _discard(session: Session, *args: Any) -> None:
    secondary.discard(session)
    session.info.pop(_STASH, None)
    session.info.pop(_EXPIRE, None)


_installed: set[Mapper[Any]] = set()
_session_listeners = False


def install_session_hooks() -> None:
    """Register the Session-level hooks once (flush and bulk statements; idempotent).

    Called when the first counter is declared, so that even a process whose
    first ORM statement is a bulk one (before any mapper is configured) is seen.
    """
    global _session_listeners
    if _session_listeners:
        return
    event.listen(Session, "before_flush", _before_flush)
    event.listen(Session, "after_flush", _after_flush)
    event.listen(Session, "after_flush_postexec", _after_flush_postexec)
    event.listen(Session, "after_soft_rollback", _discard)
    from . import bulk

    bulk.install()
    _session_listeners = True


def install(child_mapper: Mapper[Any]) -> None:
    """Attach the flush listeners for a child mapper (idempotent)."""
    install_session_hooks()
    _plans.clear()  # a new counter may change any cached read plan
    if child_mapper in _installed:
        return
    _installed.add(child_mapper)
    event.listen(child_mapper, "before_update", _before_update, propagate=True)
    event.listen(child_mapper, "before_delete", _before_delete, propagate=True)
    event.listen(child_mapper, "after_insert", _after_insert, propagate=True)
    event.listen(child_mapper, "after_update", _after_update, propagate=True)
