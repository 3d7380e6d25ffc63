"""Bulk-statement handler: keep counters exact for ORM bulk statements in ``Session.execute``.

The ``do_orm_execute`` hook (registered by :mod:`.events`) sees
``insert(Child)`` with rows (and upserts), ``update(Child)``/``delete(Child)``
with a WHERE, and bulk UPDATE by primary key, unless :func:`.pause.paused` is
in effect, and hands them to :mod:`.bulk_insert` or :mod:`.bulk_modify`,
which run the caller's statement and settle the deltas like a flush's
(:mod:`.deltas`); statements on a counted association table go to
:mod:`.association`. Inheritance: a bulk DELETE of a joined subclass (which
leaves its base rows) or one a database cascade would carry into counted
subclass rows is refused before it runs, and a Core INSERT into a joined
subclass's own table is followed by key (:func:`.bulk_modify.by_keys`).
Core ``Connection.execute`` and raw SQL never reach a session hook:
``alembic counterfill verify --fix`` repairs what they change.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState

from . import association, bulk_insert, bulk_modify, inheritance, sqlite_lock
from .counters import counters_of_child
from .errors import CounterfillError
from .pause import is_paused
from .plan import WritePlan, plan_for_statement, table_pk

log = logging.getLogger(__name__)


def on_execute(state: ORMExecuteState) -> Result[Any] | None:
    """Run a bulk statement that feeds counters and keep them exact; ``None`` passes others on."""
    stmt = state.statement
    if not stmt.is_dml or is_paused():
        return None
    wrapped = bool(getattr(stmt, "is_from_statement", False))
    dml: Any = stmt.element if wrapped else stmt  # type: ignore[attr-defined]
    if not isinstance(dml, sa.Insert | sa.Update | sa.Delete):
        return None
    plan = plan_for_statement(dml)
    if plan is None:
        # A plain association table (relationship(secondary=...)) has no plan.
        return association.run_statement(state, dml) if association.handles(dml) else None
    desc_table = dml.entity_description.get("table")
    if desc_table is not None and desc_table not in set(plan.mapper.tables):
        log.warning(
            "counterfill: %s on %s (joined inheritance) is not tracked; run verify",
            type(dml).__name__,
            desc_table,
        )
        return None
    if isinstance(dml, sa.Delete):
        _refuse_lossy_delete(state, plan, dml, desc_table if desc_table is not None else plan.table)
    if isinstance(dml, sa.Insert) and _core_into_subclass_table(plan, dml, desc_table):
        return _insert_into_own_table(state, plan, dml, desc_table)
    if isinstance(dml, sa.Insert):
        return bulk_insert.run(state, plan, dml)
    if isinstance(dml, sa.Update) and not bulk_modify.may_change(state, plan, dml):
        return None
    return bulk_modify.run(state, plan, dml, wrapped)


def _refuse_lossy_delete(state: ORMExecuteState, plan: WritePlan, dml: Any, table: Any) -> None:
    """Refuse, before it runs, a DELETE leaving counted rows half-deleted or cascading unseen."""
    problem = inheritance.delete_problem(plan.mapper, table, {c.child_table for c in plan.counters})
    if problem is not None:
        raise CounterfillError(problem)
    hierarchy = plan.mapper.base_mapper.self_and_descendants
    counted = {c.child_table for m in hierarchy for c in counters_of_child(m)}
    for message, cascades in inheritance.cascade_checks(plan.mapper, counted):
        # Only a DELETE that would really reach such rows is refused.
        probe = sa.select(
            cascades.where(dml.whereclause) if dml.whereclause is not None else cascades
        )
        params: Any = state.parameters
        for one in params if isinstance(params, list) else [params or {}]:
            if state.session.execute(probe, one).scalar():
                raise CounterfillError(message)


def _core_into_subclass_table(plan: WritePlan, dml: Any, table: Any) -> bool:
    """Whether ``dml`` is a Core statement on a joined subclass's own table (not its base's)."""
    if dml.entity_description.get("entity") is not None or table is None:
        return False
    return any(
        m.local_table is table and m.inherits is not None and not m.single
        for m in plan.mapper.base_mapper.self_and_descendants
    )


def _insert_into_own_table(
    state: ORMExecuteState, plan: WritePlan, dml: Any, table: Any
) -> Result[Any]:
    """A Core INSERT into a joined subclass's own table: it changes what base rows count as.

    ``insert(videos)`` gives existing ``items`` rows the values ``sum=`` and
    ``where=`` read, so it is followed like an UPDATE of those rows by key.
    The keys must be literal, and an upsert may conflict on the key only.
    """
    fix = (
        f"give literal keys, or insert through the class: "
        f"session.execute(insert({plan.mapper.class_.__name__}), rows)"
    )
    if table is plan.table or any(c.child_table is not plan.table for c in plan.counters):
        raise CounterfillError(
            f"a Core INSERT into {table.name!r} alone changes what rows of other tables count "
            f"as and cannot be followed; insert through the class: "
            f"session.execute(insert({plan.mapper.class_.__name__}), rows)"
        )
    if dml.select is not None:
        raise CounterfillError(f"INSERT … SELECT into {table.name!r} cannot be followed; {fix}")
    unique = [c for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
    if getattr(dml, "_post_values_clause", None) is not None and (
        unique or any(i.unique for i in table.indexes)
    ):
        raise CounterfillError(
            f"an upsert into {table.name!r} may conflict on a unique key other than its "
            f"primary key and cannot be followed; {fix}"
        )
    rows = bulk_insert.rows_of(state, dml)
    cols = table_pk(plan.mapper, table)
    keys = list(zip(*[bulk_insert.column_values(plan, rows, c) for c in cols], strict=True))
    if any(v is bulk_insert.UNKNOWN or v is None for key in keys for v in key):
        raise CounterfillError(f"INSERT into {table.name!r} without literal keys; {fix}")
    conn = state.session.connection(bind_arguments={"mapper": plan.mapper})
    if conn.dialect.name == "sqlite":
        sqlite_lock.begin_write(conn)  # before reading the old state, as every write path
    return bulk_modify.by_keys(state, plan, sorted(set(keys)))
