"""Bulk UPDATE and DELETE through ``Session.execute``: deltas from what the rows really held.

A DELETE whose caller asked for no RETURNING of its own runs as one statement
that also returns what each deleted row counted as; outside SQLite it carries
a subquery locking the matching rows in primary-key order, in the DELETE's
own snapshot, so no row is deleted unseen and writers queue instead of
deadlocking.

Every other form (UPDATE, or a DELETE with the caller's own RETURNING) first
locks the matching rows in key order, reading what each counts as, then runs
restricted to exactly those rows outside SQLite; the new state comes from
RETURNING, else from a re-read by key. Bulk UPDATE by primary key
(``update(Child)`` with a list of rows) locks and re-reads the keys in its
parameters.

Our additions cannot be evaluated in Python, so ``synchronize_session``
``'auto'``/``'evaluate'`` run as ``'fetch'`` (same session outcome); the
caller's result keeps its rowcount and returned rows. SQLite has a single
writer and needs neither lock nor restriction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.engine import cursor as _cursor
from sqlalchemy.orm import ORMExecuteState

from . import sql
from .deltas import add_rows, chunks, new_deltas, settle
from .plan import Key, WritePlan

log = logging.getLogger(__name__)


def _names(keys: Sequence[Any]) -> set[str]:
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


def written(state: ORMExecuteState, dml: Any) -> set[str]:
    """Names an UPDATE writes, from its ``values()`` and its parameters."""
    keys: list[Any] = list(getattr(dml, "_values", None) or ())
    params = state.parameters
    for row in params if isinstance(params, list) else [params or {}]:
        keys.extend(row)
    return _names(keys)


def may_change(state: ORMExecuteState, plan: WritePlan, dml: Any) -> bool:
    """Whether an UPDATE can change what any row counts as (FK, ``where`` columns, summed value)."""
    relevant = plan.watched_names
    if relevant is None:
        return True
    known = {prop.key for prop in plan.mapper.column_attrs} | {c.key for c in plan.table.columns}
    names = written(state, dml)
    # Unknown names (bind parameters of the WHERE, hybrids) are treated as relevant.
    return bool(names & relevant) or bool(names - known)


def _key_names(plan: WritePlan) -> list[str]:
    return [plan.mapper.get_property_by_column(c).key for c in plan.pk_columns]


def _param_keys(plan: WritePlan, params: Any) -> list[Key] | None:
    """Primary keys of a bulk UPDATE by primary key, or ``None`` if a row lacks one."""
    names = _key_names(plan)
    keys: list[Key] = []
    for row in params:
        if not all(n in row for n in names):
            return None
        keys.append(tuple(row[n] for n in names))
    return keys


def _multitable(where: Any, table: sa.Table) -> bool:
    froms = getattr(where, "_from_objects", ()) if where is not None else ()
    return any(not f.is_derived_from(table) for f in froms)


def _can_return(state: ORMExecuteState, plan: WritePlan, dml: Any, wrapped: bool) -> bool:
    # The caller's own RETURNING (or return_defaults) must not be disturbed.
    if wrapped or state.is_executemany or dml._returning or dml._return_defaults:
        return False
    if not plan.table.implicit_returning:
        return False
    dialect = state.session.get_bind(mapper=plan.mapper).dialect
    if _multitable(dml.whereclause, plan.table):
        return False  # UPDATE..FROM / DELETE..USING: RETURNING support varies; re-read instead
    return bool(
        dialect.delete_returning if isinstance(dml, sa.Delete) else dialect.update_returning
    )


def _state_by_keys(session: Any, plan: WritePlan, keys: list[Key], lock: bool) -> list[Any]:
    rows: list[Any] = []
    conn = session.connection(bind_arguments={"mapper": plan.mapper})
    name = conn.dialect.name
    keys = sorted(keys)
    for part in [keys] if name == "postgresql" else chunks(keys):
        where = sql.keys_in(plan.pk_columns, part, name)
        rows.extend(
            conn.execute(sql.matching_state(plan.counters, plan.pk_columns, where, lock=lock))
        )
    return rows


def _lock_matching(state: ORMExecuteState, plan: WritePlan, dml: Any, lock: bool) -> list[Any]:
    """Read (and lock) :func:`.sql.row_state` of the rows each parameter set's WHERE matches."""
    entity = dml.entity_description.get("entity")
    stmt = sql.matching_state(
        plan.counters, plan.pk_columns, dml.whereclause, entity=entity, lock=lock
    )
    if entity is not None and dml._with_options:
        stmt = stmt.options(*dml._with_options)  # with_loader_criteria() and friends
    params = state.parameters
    if not isinstance(params, list):  # one parameter set: rows come unique and in key order
        return list(state.session.execute(stmt, params or None).all())
    seen: dict[Key, Any] = {}
    for one in params:
        for row in state.session.execute(stmt, one or None).all():
            seen.setdefault(tuple(row[: len(plan.pk_columns)]), row)
    return [seen[k] for k in sorted(seen)]


def _warn_unseen(plan: WritePlan, dml: Any, extra: int) -> None:
    log.warning(
        "counterfill: %s on %s touched %d row(s) committed by another transaction after "
        "they were locked; their parents' counters may be off until `alembic counterfill "
        "verify --fix`",
        type(dml).__name__.upper(),
        plan.table.name,
        extra,
    )


def _rowless(result: Any) -> None:
    """Make a result whose only RETURNING was ours look like a plain UPDATE/DELETE result.

    Without RETURNING, SQLAlchemy gives the caller a result that "does not
    return rows" (``returns_rows`` false, ``all()`` raises); with
    ``synchronize_session='fetch'`` it adds RETURNING itself and the caller sees
    zero rows, which is what ours leaves, so that mode is left alone.
    """
    no_rows = getattr(_cursor, "_NO_CURSOR_DML", None)
    if isinstance(result, CursorResult) and no_rows is not None:
        # Private attributes, pinned by tests/test_bulk_forms.py (same result as untracked).
        result._soft_close()
        result._metadata = result._no_result_metadata
        result.cursor_strategy = no_rows


def _fetch_instead_of_evaluate(state: ORMExecuteState, plan: WritePlan) -> dict[str, Any]:
    """Execution options for a statement carrying our key restriction.

    The restriction cannot be evaluated in Python, so ``'auto'``/``'evaluate'``
    become ``'fetch'``, which leaves the session in the same state; when the
    session holds no object of the child class there is nothing to
    synchronize, and ``False`` skips fetch's per-row work.
    """
    if state.update_delete_options._synchronize_session not in ("auto", "evaluate"):
        return {}
    loaded = any(s.mapper.isa(plan.mapper) for s in state.session.identity_map.all_states())
    return {"synchronize_session": "fetch" if loaded else False}


def _delete_returning(
    state: ORMExecuteState, plan: WritePlan, dml: Any, one_writer: bool
) -> Result[Any]:
    """DELETE that reports what it deleted through RETURNING; nothing is read first.

    Elsewhere than SQLite a locking subquery, which shares the DELETE's
    snapshot, locks the matching rows in key order before any is deleted, so
    no row escapes it and concurrent writers queue instead of deadlocking.
    RETURNING gives each deleted row's last version.
    """
    stmt, options = dml, {}
    if not one_writer:
        entity = dml.entity_description.get("entity")
        where = dml.whereclause
        stmt = stmt.where(
            sql.locked_among(plan.pk_columns, where, entity=entity, options=dml._with_options)
        )
        options = _fetch_instead_of_evaluate(state, plan)
    stmt = stmt.return_defaults(*sql.row_state(plan.counters, plan.pk_columns))
    result = state.invoke_statement(statement=stmt, execution_options=options)
    deleted = list(getattr(result, "returned_defaults_rows", None) or ())
    if state.update_delete_options._synchronize_session != "fetch":
        _rowless(result)
    deltas = new_deltas()
    add_rows(deltas, plan, deleted, -1)
    settle(state.session, deltas)
    return result


def _by_primary_key(state: ORMExecuteState, plan: WritePlan, keys: list[Key]) -> Result[Any]:
    """Bulk UPDATE by primary key: lock and read the keys, run it, read them again."""
    deltas = new_deltas()
    add_rows(deltas, plan, _state_by_keys(state.session, plan, keys, lock=True), -1)
    result = state.invoke_statement()
    add_rows(deltas, plan, _state_by_keys(state.session, plan, keys, lock=False), +1)
    settle(state.session, deltas)
    return result


def run(state: ORMExecuteState, plan: WritePlan, dml: Any, wrapped: bool) -> Result[Any]:
    """Run the caller's UPDATE/DELETE and apply the counter deltas it caused."""
    session = state.session
    dialect = session.get_bind(mapper=plan.mapper).dialect
    one_writer = dialect.name == "sqlite"  # no concurrent writer can slip in between
    is_delete = isinstance(dml, sa.Delete)
    returning = _can_return(state, plan, dml, wrapped)
    if not is_delete and state.is_executemany:
        keys = _param_keys(plan, state.parameters)
        if keys is not None:
            return _by_primary_key(state, plan, keys)
    if is_delete and returning:
        return _delete_returning(state, plan, dml, one_writer)

    # Lock and read the matching rows, then restrict the statement to them.
    n_pk = len(plan.pk_columns)
    old = _lock_matching(state, plan, dml, lock=not one_writer)
    keys = [tuple(row[:n_pk]) for row in old]
    deltas = new_deltas()
    add_rows(deltas, plan, old, -1)
    stmt, options = dml, {}
    restricted = not one_writer and not wrapped
    if restricted:
        stmt = stmt.where(sql.keys_in(plan.pk_columns, keys, dialect.name))
        options = _fetch_instead_of_evaluate(state, plan)

    if returning:  # an UPDATE: its RETURNING gives the new state, even of moved keys
        # return_defaults() returns only table columns for an UPDATE; SQL
        # expressions need supplemental_cols, whose rows the result replays.
        cols = sql.row_state(plan.counters, plan.pk_columns)
        stmt = stmt.return_defaults(*plan.pk_columns, supplemental_cols=cols)
        result = state.invoke_statement(statement=stmt, execution_options=options)
        result.all()  # drain the replayed rows: the caller's statement returned none
        add_rows(deltas, plan, list(getattr(result, "returned_defaults_rows", None) or ()), +1)
        if state.update_delete_options._synchronize_session != "fetch":
            _rowless(result)
        settle(session, deltas)
        return result

    result = state.invoke_statement(statement=stmt, execution_options=options)
    if not is_delete and bool(written(state, dml) & set(_key_names(plan))):
        log.warning(
            "counterfill: UPDATE of %s primary key without RETURNING cannot be followed; "
            "run `alembic counterfill verify --fix`",
            plan.table.name,
        )
        return result
    still = _state_by_keys(session, plan, keys, lock=False)
    add_rows(deltas, plan, still, +1)
    rowcount = getattr(result, "rowcount", None)
    if not restricted and not one_writer and isinstance(rowcount, int) and rowcount >= 0:
        seen = len(keys) - len(still) if is_delete else len(keys)
        if rowcount > seen:  # a wrapped statement ran unrestricted and met newer rows
            _warn_unseen(plan, dml, rowcount - seen)
    settle(session, deltas)
    return result
