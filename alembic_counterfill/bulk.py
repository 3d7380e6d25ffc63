"""Keep counters exact for ORM bulk statements run through ``Session.execute``.

A ``do_orm_execute`` hook sees ``insert(Child)`` with rows (and upserts),
``update(Child)``/``delete(Child)`` with a WHERE, and bulk UPDATE by primary
key, unless :func:`.pause.paused` is in effect. :mod:`.bulk_insert` and
:mod:`.bulk_modify` run the caller's statement and work out the deltas; this
module applies them through :func:`.listeners.apply`, like a flush's, plus
exact recounts where deltas cannot be derived, locking parents in the order
flushes do. Core ``Connection.execute`` and raw SQL never reach a session
hook: ``alembic counterfill verify --fix`` repairs what they change.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Result
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, configure_mappers

from . import counters as _counters
from . import listeners, sql
from .counters import Counter
from .pause import is_paused

log = logging.getLogger(__name__)

#: ``{parent_mapper: {parent_id: {counter: delta}}}``, the shape :func:`.listeners.apply` takes.
Deltas = dict[Mapper[Any], dict[Any, dict[Counter, Any]]]
#: Parents whose counters are set to their exact truth: ``{counter: {parent_id, ...}}``.
Recounts = dict[Counter, set[Any]]

#: Keys per ``IN (...)``: well under SQLite's 32,766 bound parameters per statement.
CHUNK = 5000


def install() -> None:
    """Register the bulk-statement hook on every :class:`~sqlalchemy.orm.Session` (idempotent)."""
    if not event.contains(Session, "do_orm_execute", _on_execute):
        event.listen(Session, "do_orm_execute", _on_execute)


def new_deltas() -> Deltas:
    """An empty, auto-vivifying delta map."""
    return defaultdict(lambda: defaultdict(lambda: defaultdict(int)))


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most :data:`CHUNK` items."""
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def add_rows(deltas: Deltas, plan: Any, rows: Iterable[Any], sign: int, prefix: str = "") -> None:
    """Add ``sign`` times each row's ``<prefix>k<i>``/``<prefix>v<i>`` (:func:`.sql.row_state`)."""
    rows = rows if isinstance(rows, list) else list(rows)
    if not rows:
        return
    fields = rows[0]._fields  # by label: RETURNING may order the columns its own way
    for i, counter in enumerate(plan.counters):
        pids = map(itemgetter(fields.index(f"{prefix}k{i}")), rows)
        values = map(itemgetter(fields.index(f"{prefix}v{i}")), rows)
        per_parent: dict[Any, Any]
        if counter.summed is None:  # values are 0/1: let Counter tally them in C
            per_parent = Tally(pid for pid, value in zip(pids, values, strict=True) if value)
        else:
            per_parent = defaultdict(int)
            for pid, value in zip(pids, values, strict=True):
                if value:
                    per_parent[pid] += value
        per_parent.pop(None, None)
        target = deltas[counter.parent_mapper]
        for parent_id, total in per_parent.items():
            target[parent_id][counter] += sign * total


def settle(session: Session, deltas: Deltas, recounts: Recounts | None = None) -> None:
    """Apply deltas and exact recounts parent table by parent table, then expire loaded parents.

    Tables go in name order and parents in key order, the order every flush
    locks them in, so bulk statements and flushes never deadlock on parents.
    """
    wanted: dict[Mapper[Any], dict[Counter, set[Any]]] = defaultdict(dict)
    for counter, ids in (recounts or {}).items():
        ids = {x for x in ids if x is not None}
        if ids:
            wanted[counter.parent_mapper][counter] = ids
    expire: dict[tuple[Mapper[Any], Any], set[str]] = defaultdict(set)
    for mapper in sorted(set(deltas) | set(wanted), key=_table_name):
        if mapper in wanted:
            # Deltas and recounts lock in two statements: lock the union first,
            # in one key-ordered pass, or two passes could interleave out of order.
            ids = set(deltas.get(mapper, ())).union(*wanted[mapper].values())
            _lock(session, mapper, next(iter(wanted[mapper])), sorted(ids))
        if deltas.get(mapper):
            listeners.apply(session, {mapper: deltas[mapper]})
        if mapper in wanted:
            _recount(session, mapper, wanted[mapper], expire)
    _expire_now(session, expire)


def _table_name(mapper: Mapper[Any]) -> str:
    # The order listeners.apply() visits parent tables in.
    return str(getattr(mapper.local_table, "name", ""))


def _lock(session: Session, mapper: Mapper[Any], counter: Counter, ids: list[Any]) -> None:
    conn = session.connection(bind_arguments={"mapper": mapper})
    if conn.dialect.name != "sqlite":  # SQLite has one writer: nothing to wait for
        for part in chunks(ids):
            conn.execute(
                sql.lock_parents(counter.parent_table, counter.parent_pk, None, None, ids=part)
            )


def _recount(
    session: Session,
    mapper: Mapper[Any],
    wanted: dict[Counter, set[Any]],
    expire: dict[tuple[Mapper[Any], Any], set[str]],
) -> None:
    # The batch protocol: the parents are already locked (settle()); recount
    # in new statements, whose snapshot includes every writer we waited for.
    counters = sorted(wanted, key=lambda c: c.key)
    ids = sorted(set().union(*wanted.values()))
    conn = session.connection(bind_arguments={"mapper": mapper})
    for part in chunks(ids):
        conn.execute(sql.recount_range(counters, None, None, ids=part))
    for pid in ids:
        expire[(mapper, pid)].update(c.attr_key for c in counters)


def _expire_now(session: Session, extra: dict[tuple[Mapper[Any], Any], set[str]]) -> None:
    # listeners.apply() schedules expiry for the end of a flush; a bulk
    # statement has no flush, so loaded parents are expired right away.
    if session._flushing:  # inside a flush: its own after_flush_postexec expires them
        return
    todo = dict(extra)
    for key, attrs in (session.info.pop(listeners._EXPIRE, None) or {}).items():
        todo.setdefault(key, set()).update(attrs)
    for (mapper, pid), attrs in todo.items():
        obj = session.identity_map.get(mapper.identity_key_from_primary_key((pid,)))
        if obj is not None:
            session.expire(obj, list(attrs))


def _names(plan: Any, keys: Sequence[Any]) -> set[str]:
    """Attribute and column names written by a statement's SET clause or parameters."""
    out: set[str] = set()
    for key in keys:
        if isinstance(key, str):
            out.add(key)
        elif isinstance(getattr(key, "key", None), str):
            out.add(key.key)
            if isinstance(getattr(key, "name", None), str):
                out.add(key.name)
        else:
            out.add("?")  # unrecognised target: assume it may matter
    return out


def written(state: ORMExecuteState, plan: Any, dml: Any) -> set[str]:
    """Names an UPDATE writes, from its ``values()`` and its parameters."""
    keys: list[Any] = list(getattr(dml, "_values", None) or ())
    params = state.parameters
    for row in params if isinstance(params, list) else [params or {}]:
        keys.extend(row)
    return _names(plan, keys)


def _relevant(plan: Any) -> set[str] | None:
    """Names whose change can move a contribution; ``None`` when any write may."""
    if plan.watched is None:
        return None
    out = set(plan.watched)
    for key in plan.watched:
        for col in plan.mapper.attrs[key].columns:
            out |= {col.key, col.name}
    return out


def may_change(state: ORMExecuteState, plan: Any, dml: Any) -> bool:
    """Whether an UPDATE can change what any row counts as (FK, ``where`` columns, summed value)."""
    relevant = _relevant(plan)
    if relevant is None:
        return True
    known = {p.key for p in plan.mapper.column_attrs} | {c.key for c in plan.table.columns}
    names = written(state, plan, dml)
    # Unknown names (bind parameters of the WHERE, hybrids) are treated as relevant.
    return bool(names & relevant) or bool(names - known)


def _plan_of(dml: Any) -> Any:
    # A bulk statement can be a program's first use of the models, and the ORM
    # does not configure mappers for it: counters resolve at configuration.
    configure_mappers()
    desc = dml.entity_description
    entity = desc.get("entity")
    if entity is not None:
        return listeners.plan_for(sa.inspect(entity).mapper)
    # Core statement on a Table, still run through the Session: find its mapper.
    for mapper in list(_counters._by_child):
        if mapper.local_table is desc.get("table"):
            return listeners.plan_for(mapper)
    return None


def _on_execute(state: ORMExecuteState) -> Result[Any] | None:
    """Run a bulk statement that feeds counters and keep them exact; ``None`` passes others on."""
    stmt = state.statement
    if not stmt.is_dml or is_paused():
        return None
    wrapped = bool(getattr(stmt, "is_from_statement", False))
    dml: Any = stmt.element if wrapped else stmt  # type: ignore[attr-defined]
    if not isinstance(dml, sa.Insert | sa.Update | sa.Delete):
        return None
    from . import secondary

    if secondary.handles(dml):
        return secondary.run_statement(state, dml)
    plan = _plan_of(dml)
    if plan is None:
        return None
    desc_table = dml.entity_description.get("table")
    if desc_table is not None and desc_table is not plan.table:
        log.warning(
            "counterfill: %s on %s (joined inheritance) is not tracked; run verify",
            type(dml).__name__,
            desc_table,
        )
        return None
    if isinstance(dml, sa.Insert):
        from . import bulk_insert

        return bulk_insert.run(state, plan, dml)
    if isinstance(dml, sa.Update) and not may_change(state, plan, dml):
        return None
    from . import bulk_modify

    return bulk_modify.run(state, plan, dml, wrapped)
