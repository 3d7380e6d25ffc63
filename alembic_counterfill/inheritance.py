"""Inheritance: which rows of a counting table belong to a mapped subclass, as SQL over that table.

A counter counts rows of one table, the one holding its FK (the counting
table). A target on a subclass counts only that subclass's rows (its
subclasses' included): with single-table inheritance, rows whose
discriminator is one of the subclass's identities; with joined-table
inheritance, the discriminator too when the base table has one, else rows
that have a row in the subclass's own table. ``where=`` may use any table of
the subclass (a joined subclass's own columns); columns of another table of
the hierarchy become a correlated ``EXISTS`` joined on the primary key, so
every counter stays one expression over its counting table, and live deltas,
bulk statements, backfills and ``verify`` share it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import visitors

# SQLAlchemy internal: no public API drops ORM annotations from an expression
# (guarded by tests/test_orm_sqlalchemy_internals.py).
from sqlalchemy.sql.annotation import _deep_deannotate


def plain(expr: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """``expr`` without ORM annotations.

    ``Comment.flagged`` carries its entity: a SELECT containing it would get
    Comment's discriminator criteria added by the ORM, on top of the
    statement's own, and match no row of another subclass.
    """
    return _deep_deannotate(expr)


def tables_of(expr: Any) -> set[sa.Table]:
    """Every table whose columns appear in ``expr`` (subqueries included)."""
    found: set[sa.Table] = set()
    for el in visitors.iterate(expr):
        table = getattr(el, "table", None)
        if isinstance(el, sa.ColumnClause) and isinstance(table, sa.Table):
            found.add(table)
    return found


def _pk_join(mapper: Mapper[Any], a: sa.Table, b: sa.Table) -> sa.ColumnElement[bool]:
    """``a.pk = b.pk`` for two tables of one joined-inheritance hierarchy (same key values)."""
    conds = []
    for col in mapper.primary_key:
        by_table = {c.table: c for c in mapper.get_property_by_column(col).columns}
        conds.append(by_table[a] == by_table[b])
    return sa.and_(*conds)


def localize(
    mapper: Mapper[Any], table: sa.Table, expr: sa.ColumnElement[bool]
) -> sa.ColumnElement[bool]:
    """``expr`` as a condition over ``table`` alone: other tables of ``mapper`` become EXISTS."""
    others = tables_of(expr) - {table}
    if not others:
        return expr
    inner = sa.select(sa.literal(1)).where(
        *[_pk_join(mapper, other, table) for other in sorted(others, key=lambda t: t.name)],
        expr,
    )
    return inner.correlate(table).exists()


def value_over(
    mapper: Mapper[Any], table: sa.Table, column: sa.Column[Any]
) -> sa.ColumnElement[Any]:
    """``column``, of another table of ``mapper``, read for a row of ``table`` (scalar subquery)."""
    if column.table is table:
        return column
    found = sa.select(column).where(_pk_join(mapper, column.table, table))
    return found.correlate(table).scalar_subquery()


def restriction(mapper: Mapper[Any], table: sa.Table) -> sa.ColumnElement[bool] | None:
    """SQL over ``table`` true exactly for the rows of ``mapper`` (and its subclasses).

    ``None`` when every row of ``table`` is one: the hierarchy's base, or a
    joined subclass counting rows of its own table.
    """
    if mapper.inherits is None:
        return None
    if not mapper.single and mapper.local_table is table:
        return None
    discriminator = mapper.polymorphic_on
    if isinstance(discriminator, sa.Column):
        identities = sorted(
            {m.polymorphic_identity for m in mapper.self_and_descendants} - {None},
            key=str,
        )
        return localize(mapper, table, discriminator.in_(identities))
    own = mapper.local_table
    assert isinstance(own, sa.Table)
    return sa.select(sa.literal(1)).where(_pk_join(mapper, own, table)).correlate(table).exists()


def hierarchy_tables(mapper: Mapper[Any]) -> set[sa.Table]:
    """The tables a row of ``mapper`` lives in (its own and its ancestors')."""
    return {t for t in mapper.tables if isinstance(t, sa.Table)}


def cascade_checks(mapper: Mapper[Any], counted: set[sa.Table]) -> list[tuple[str, sa.Exists]]:
    """For a DELETE through ``mapper``: the rows a database cascade would delete unseen.

    One ``(message, EXISTS)`` per joined subclass whose own table has an
    ``ON DELETE CASCADE`` FK to ``mapper``'s table and holds the FK of a
    counter (``counted``): the EXISTS, given the DELETE's WHERE, tells whether
    the statement would cascade into such rows.
    """
    table = mapper.local_table
    found = []
    for sub in mapper.self_and_descendants:
        own = sub.local_table
        if sub.single or own is table or own not in counted or not isinstance(own, sa.Table):
            continue
        if not any(
            (fk.ondelete or "").upper() == "CASCADE" and fk.column.table is table
            for fk in own.foreign_keys
        ):
            continue
        message = (
            f"DELETE of {mapper.class_.__name__} rows makes the database delete "
            f"{sub.class_.__name__} rows of {own.name!r} (ON DELETE CASCADE) unseen, which "
            "counters count; delete those objects with session.delete(), or narrow the "
            f"WHERE to rows that are no {sub.class_.__name__}"
        )
        assert isinstance(table, sa.Table)
        found.append((message, sa.exists().where(_pk_join(sub, own, table))))
    return found


def delete_problem(mapper: Mapper[Any], table: Any, fed: set[sa.Table]) -> str | None:
    """Why a bulk DELETE of a joined subclass on ``table`` cannot keep counters exact, or ``None``.

    ``fed`` are the tables holding the FKs of the counters the deleted rows
    feed. SQLAlchemy deletes a joined subclass's rows from its own table
    only: the base rows stay, so counters over the base table would go on
    counting half-deleted rows.
    """
    own = mapper.local_table
    if (
        mapper.single
        or mapper.inherits is None
        or not isinstance(own, sa.Table)
        or table is not own
    ):
        return None
    left = sorted({t.name for t in fed} - {own.name})
    if not left:
        return None
    base = mapper.base_mapper.class_.__name__
    return (
        f"DELETE of {mapper.class_.__name__} deletes rows of {own.name!r} only and leaves "
        f"their {', '.join(repr(t) for t in left)} rows, which counters count; delete the "
        f"objects with session.delete(), or delete({base}) with ON DELETE CASCADE"
    )
