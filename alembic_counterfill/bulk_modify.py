"""Bulk UPDATE and DELETE through ``Session.execute``: deltas from what the rows really held.

Every form first locks the child rows it will touch, in primary-key order (the
order flushes lock them in, so no deadlocks), reading what they count as. Then
the caller's statement runs, and the new state is taken from:

- RETURNING, added with ``return_defaults()`` when the caller's statement has
  no RETURNING of its own (rowcount and returned rows stay the caller's). A
  DELETE's RETURNING lists the rows actually deleted, including any that a
  concurrent transaction committed after our lock; on PostgreSQL an UPDATE's
  RETURNING also reads each row's old state from the statement's snapshot;
- otherwise a re-read of the locked rows by key.

Bulk UPDATE by primary key (``update(Child)`` with a list of rows) locks and
re-reads exactly the keys in the parameters.
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
from .bulk import add_rows, chunks, new_deltas, settle

log = logging.getLogger(__name__)

Key = tuple[Any, ...]


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


def _written(state: ORMExecuteState, plan: Any, dml: Any) -> set[str]:
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
    written = _written(state, plan, dml)
    # Unknown names (bind parameters of the WHERE, hybrids) are treated as relevant.
    return bool(written & relevant) or bool(written - known)


def _key_names(plan: Any) -> list[str]:
    return [plan.mapper.get_property_by_column(c).key for c in plan.pk_columns]


def _param_keys(plan: Any, params: Any) -> list[Key] | None:
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


def _can_return(state: ORMExecuteState, plan: Any, dml: Any, wrapped: bool) -> bool:
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


def _state_by_keys(session: Any, plan: Any, keys: list[Key], lock: bool) -> list[Any]:
    rows: list[Any] = []
    conn = session.connection(bind_arguments={"mapper": plan.mapper})
    for part in chunks(sorted(keys)):
        stmt = sql.child_state(plan.counters, plan.pk_columns, part, lock=lock)
        rows.extend(conn.execute(stmt).all())
    return rows


def _lock_matching(state: ORMExecuteState, plan: Any, dml: Any, lock: bool) -> list[Any]:
    """Read (and lock) :func:`.sql.row_state` of the rows each parameter set's WHERE matches."""
    entity = dml.entity_description.get("entity")
    stmt = sql.matching_state(
        plan.counters, plan.pk_columns, dml.whereclause, entity=entity, lock=lock
    )
    if entity is not None and dml._with_options:
        stmt = stmt.options(*dml._with_options)  # with_loader_criteria() and friends
    params = state.parameters
    seen: dict[Key, Any] = {}
    for p in params if isinstance(params, list) else [params]:
        for row in state.session.execute(stmt, p or None).all():
            seen.setdefault(tuple(row[: len(plan.pk_columns)]), row)
    return [seen[k] for k in sorted(seen)]


def _warn_unseen(plan: Any, dml: Any, extra: int) -> None:
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


def run(state: ORMExecuteState, plan: Any, dml: Any, wrapped: bool) -> Result[Any]:
    """Run the caller's UPDATE/DELETE and apply the counter deltas it caused."""
    session = state.session
    dialect = session.get_bind(mapper=plan.mapper).dialect
    one_writer = dialect.name == "sqlite"  # no concurrent writer can slip in between
    is_delete = isinstance(dml, sa.Delete)
    deltas = new_deltas()
    n_pk = len(plan.pk_columns)

    if not is_delete and state.is_executemany:
        keys = _param_keys(plan, state.parameters)
        if keys is not None:  # bulk UPDATE by primary key: the keys are in the parameters
            old = _state_by_keys(session, plan, keys, lock=True)
            result = state.invoke_statement()
            add_rows(deltas, plan, old, -1)
            add_rows(deltas, plan, _state_by_keys(session, plan, keys, lock=False), +1)
            settle(session, deltas)
            return result

    returning = _can_return(state, plan, dml, wrapped)
    moves_key = not is_delete and bool(_written(state, plan, dml) & set(_key_names(plan)))
    old_inline = returning and not is_delete and dialect.name == "postgresql" and not moves_key
    # A RETURNING DELETE on SQLite needs no pre-read: nothing can change in between.
    old = (
        []
        if (returning and is_delete and one_writer)
        else _lock_matching(state, plan, dml, lock=not one_writer)
    )

    if returning:
        cols = sql.row_state(plan.counters, plan.pk_columns)
        if old_inline:
            cols += sql.old_row_state(plan.counters, plan.pk_columns)
        if is_delete:
            result = state.invoke_statement(statement=dml.return_defaults(*cols))
        else:
            # UPDATE returns only table columns through return_defaults(); SQL
            # expressions need supplemental_cols, whose rows the result then
            # replays: drain them so the caller sees what 'fetch' would give.
            stmt = dml.return_defaults(*plan.pk_columns, supplemental_cols=cols)
            result = state.invoke_statement(statement=stmt)
            result.all()
        returned = list(getattr(result, "returned_defaults_rows", None) or ())
        if state.update_delete_options._synchronize_session != "fetch":
            _rowless(result)
        if is_delete:
            add_rows(deltas, plan, returned, -1)
        elif old_inline:
            add_rows(deltas, plan, returned, +1)
            add_rows(deltas, plan, returned, -1, prefix="o")
        else:
            add_rows(deltas, plan, returned, +1)
            add_rows(deltas, plan, old, -1)
            if not one_writer and len(returned) > len(old):
                _warn_unseen(plan, dml, len(returned) - len(old))
        settle(session, deltas)
        return result

    result = state.invoke_statement()
    keys = [tuple(row[:n_pk]) for row in old]
    add_rows(deltas, plan, old, -1)
    if moves_key:
        log.warning(
            "counterfill: UPDATE of %s primary key without RETURNING cannot be followed; "
            "run `alembic counterfill verify --fix`",
            plan.table.name,
        )
        return result
    still = _state_by_keys(session, plan, keys, lock=False)
    add_rows(deltas, plan, still, +1)
    rowcount = getattr(result, "rowcount", None)
    if not one_writer and isinstance(rowcount, int) and rowcount >= 0:
        seen = len(keys) - len(still) if is_delete else len(keys)
        if rowcount > seen:
            _warn_unseen(plan, dml, rowcount - seen)
    settle(session, deltas)
    return result
