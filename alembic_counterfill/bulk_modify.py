"""Bulk UPDATE and DELETE through ``Session.execute``: deltas from what the rows really held.

Every form first locks the child rows it matches, in primary-key order (the
order flushes lock them in), reading what each counts as. Then the caller's
statement runs, restricted on PostgreSQL to the rows just locked: a row that
another transaction commits in between is neither touched unseen nor waited
for out of key order, so bulk statements and flushes cannot deadlock on child
rows. The restriction makes ``synchronize_session='evaluate'`` impossible, so
``'auto'``/``'evaluate'`` run as ``'fetch'`` (same session outcome). What the
rows count as afterwards comes from RETURNING when the caller's statement has
none of its own (the caller still sees its usual result), else from a re-read
by key. SQLite has a single writer and needs neither lock nor restriction.

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
    name = conn.dialect.name
    keys = sorted(keys)
    for part in [keys] if name == "postgresql" else chunks(keys):
        where = sql.key_restriction(plan.pk_columns, part, name)
        rows.extend(
            conn.execute(sql.matching_state(plan.counters, plan.pk_columns, where, lock=lock))
        )
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
    if not isinstance(params, list):  # one parameter set: rows come unique and in key order
        return list(state.session.execute(stmt, params or None).all())
    seen: dict[Key, Any] = {}
    for p in params:
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


def _fetch_instead_of_evaluate(state: ORMExecuteState, plan: Any) -> dict[str, Any]:
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


def _delete_in_one_statement(state: ORMExecuteState, plan: Any, dml: Any) -> Result[Any]:
    """PostgreSQL DELETE: lock in key order and return what was deleted, in the statement itself.

    The locking subquery shares the DELETE's snapshot, so no row escapes it;
    RETURNING reports each deleted row's last version. Nothing is read first.
    """
    entity = dml.entity_description.get("entity")
    stmt = dml.where(
        sql.locked_among(plan.pk_columns, dml.whereclause, entity=entity, options=dml._with_options)
    ).return_defaults(*sql.row_state(plan.counters, plan.pk_columns))
    result = state.invoke_statement(
        statement=stmt, execution_options=_fetch_instead_of_evaluate(state, plan)
    )
    deleted = list(getattr(result, "returned_defaults_rows", None) or ())
    if state.update_delete_options._synchronize_session != "fetch":
        _rowless(result)
    deltas = new_deltas()
    add_rows(deltas, plan, deleted, -1)
    settle(state.session, deltas)
    return result


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

    if is_delete and dialect.name == "postgresql" and _can_return(state, plan, dml, wrapped):
        return _delete_in_one_statement(state, plan, dml)

    old = _lock_matching(state, plan, dml, lock=not one_writer)
    keys = [tuple(row[:n_pk]) for row in old]
    add_rows(deltas, plan, old, -1)
    stmt, options = dml, {}
    restricted = not one_writer and not wrapped
    if restricted:
        stmt = stmt.where(sql.key_restriction(plan.pk_columns, keys, dialect.name))
        options = _fetch_instead_of_evaluate(state, plan)
    moves_key = not is_delete and bool(_written(state, plan, dml) & set(_key_names(plan)))

    if _can_return(state, plan, dml, wrapped):
        if is_delete:
            stmt = stmt.return_defaults(*sql.row_state(plan.counters, plan.pk_columns))
        else:
            # UPDATE returns only table columns through return_defaults(); SQL
            # expressions need supplemental_cols, whose rows the result replays.
            cols = sql.row_state(plan.counters, plan.pk_columns)
            stmt = stmt.return_defaults(*plan.pk_columns, supplemental_cols=cols)
        result = state.invoke_statement(statement=stmt, execution_options=options)
        if not is_delete:
            result.all()  # drain the replayed rows: the caller's statement returned none
        new = list(getattr(result, "returned_defaults_rows", None) or ())
        if state.update_delete_options._synchronize_session != "fetch":
            _rowless(result)
        if is_delete:  # RETURNING lists the rows deleted; re-add the locked rows it left
            gone = {tuple(r._mapping[f"p{j}"] for j in range(n_pk)) for r in new}
            add_rows(deltas, plan, [r for r in old if tuple(r[:n_pk]) not in gone], +1)
        else:
            add_rows(deltas, plan, new, +1)
            if not restricted and not one_writer and len(new) > len(old):
                _warn_unseen(plan, dml, len(new) - len(old))
        settle(session, deltas)
        return result

    result = state.invoke_statement(statement=stmt, execution_options=options)
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
    if not restricted and not one_writer and isinstance(rowcount, int) and rowcount >= 0:
        seen = len(keys) - len(still) if is_delete else len(keys)
        if rowcount > seen:
            _warn_unseen(plan, dml, rowcount - seen)
    settle(session, deltas)
    return result
