"""Buffered (hot-parent) counters: the insert-only deltas table, appending to it, exact reads.

A counter declared with ``counter_cache(..., buffered=True)`` is not updated in
the writer's transaction. The writer appends one row per parent to the parent
table's deltas table instead (``counterfill_deltas_<table>``: ``parent_id``, one
column per buffered counter of that table, ``created_at``): an insert touches
no shared row, so writers of one popular parent no longer queue on its row
lock. :mod:`.fold` later moves pending deltas into the columns. An exact value
is the column plus the parent's pending deltas, read in one statement (one
snapshot): a writer's child row and its delta row commit together.

The deltas table lives in the parent table's own ``MetaData``, built when the
counter column is attached to its table, so ``metadata.create_all()`` and
Alembic autogenerate create it like any other table of the app.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from .errors import CounterDeclarationError, DatabaseError

#: Prefix of every deltas table's name.
PREFIX = "counterfill_deltas_"

#: Column names of a deltas table that are not counters.
RESERVED = frozenset({"id", "parent_id", "created_at"})

# parent table -> its deltas table; parent table -> counter columns waiting for the parent's key
_tables: dict[sa.Table, sa.Table] = {}
_waiting: dict[sa.Table, list[sa.Column[Any]]] = {}
_listening = False


def table_name(parent: sa.Table) -> str:
    """The deltas table's name for ``parent``, kept within PostgreSQL's 63-character limit."""
    name = PREFIX + parent.name
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(parent.name.encode()).hexdigest()[:8]
    return f"{name[:54]}_{digest}"


def declare(column: sa.Column[Any]) -> None:
    """Arrange for ``column`` (a buffered counter) to get a column in its table's deltas table."""
    event.listen(column, "after_parent_attach", _attached)


def _attached(column: sa.Column[Any], table: Any) -> None:
    if not isinstance(table, sa.Table):
        return
    if column.name in RESERVED:
        raise CounterDeclarationError(
            f"{table.name}.{column.name}: a buffered counter cannot be named {column.name!r}; "
            "rename the counter column"
        )
    _waiting.setdefault(table, []).append(column)
    _build(table)
    if table in _waiting:
        # The primary key is declared after the counter: build when it arrives.
        global _listening
        if not _listening:
            event.listen(sa.Column, "after_parent_attach", _any_column_attached)
            _listening = True


def _any_column_attached(column: sa.Column[Any], table: Any) -> None:
    if isinstance(table, sa.Table) and table in _waiting and column.primary_key:
        _build(table)


def _build(parent: sa.Table) -> None:
    pks = list(parent.primary_key.columns)
    if len(pks) != 1:
        return  # not yet (or composite: counters.resolve() reports that at configuration)
    columns = _waiting.pop(parent, [])
    deltas = _tables.get(parent)
    if deltas is None:
        pk = pks[0]
        key_type = pk.type if not isinstance(pk.type, sa.types.NullType) else None
        deltas = sa.Table(
            table_name(parent),
            parent.metadata,
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                primary_key=True,
                autoincrement=True,
            ),
            # A parent's deletion takes its pending deltas with it.
            sa.Column(
                "parent_id",
                key_type,
                sa.ForeignKey(pk, ondelete="CASCADE"),
                nullable=False,
                index=True,
            ),
            sa.Column(
                "created_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.current_timestamp(),
            ),
            schema=parent.schema,
            info={"counterfill_deltas_of": parent.name},
        )
        _tables[parent] = deltas
    for column in columns:
        if column.name not in deltas.c:
            deltas.append_column(
                sa.Column(column.name, column.type, nullable=False, server_default="0")
            )


def deltas_of(parent: sa.Table) -> sa.Table | None:
    """The deltas table of ``parent``, or ``None`` when it has no buffered counter."""
    return _tables.get(parent)


def is_buffered(counter: Any) -> bool:
    """Whether ``counter`` was declared with ``buffered=True``."""
    table = _tables.get(counter.parent_table)
    return table is not None and counter.column.name in table.c


#: Dialects whose SQL can fold and recount buffered counters exactly.
SUPPORTED = frozenset({"postgresql", "sqlite"})


def check_dialect(connection: Connection, parent: sa.Table) -> None:
    """Refuse buffered counters on databases where folds and recounts cannot be exact."""
    name = connection.dialect.name
    if name not in SUPPORTED:
        raise DatabaseError(
            f"{parent.name}: buffered counters (counter_cache(..., buffered=True)) are not "
            f"supported on {name}; declare them without buffered=True, or use PostgreSQL"
        )


def append(
    connection: Connection,
    parent: sa.Table,
    deltas: Mapping[Any, Mapping[sa.Column[Any], Any]],
) -> None:
    """Append one deltas row per parent (``deltas[parent_id][counter column] = d``): insert only."""
    check_dialect(connection, parent)
    table = _tables[parent]
    rows = []
    names = sorted({col.name for d in deltas.values() for col in d})
    for pid in sorted(deltas):
        by_name = {col.name: d for col, d in deltas[pid].items()}
        rows.append({"parent_id": pid, **{n: by_name.get(n, 0) for n in names}})
    if rows:
        connection.execute(sa.insert(table), rows)


def pending(counter: Any, parent_pk: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The sum of ``counter``'s pending deltas for the parent row ``parent_pk`` (correlated)."""
    table = _tables[counter.parent_table]
    d = table.alias("pending")
    total = sa.select(sa.func.coalesce(sa.func.sum(d.c[counter.column.name]), 0)).where(
        d.c.parent_id == parent_pk
    )
    return total.scalar_subquery()


def cached(counter: Any, parent_pk: sa.ColumnElement[Any] | None = None) -> sa.ColumnElement[Any]:
    """What the cache says ``counter`` is: its column, plus pending deltas when buffered."""
    if not is_buffered(counter):
        return counter.column
    pk = counter.parent_pk if parent_pk is None else parent_pk
    return counter.column + pending(counter, pk)


def exact_value(counter: Any, parent_id: Any) -> sa.Select[Any]:
    """Select column + pending deltas of one parent, in one statement (one snapshot)."""
    return sa.select(cached(counter)).where(counter.parent_pk == parent_id)


def _scope(column: sa.ColumnElement[Any], lo: Any, hi: Any, ids: Sequence[Any] | None) -> Any:
    cond: Any = sa.true()
    if lo is not None:
        cond = sa.and_(cond, column >= lo)
    if hi is not None:
        cond = sa.and_(cond, column < hi)
    if ids is not None:
        cond = sa.and_(cond, column.in_(list(ids)))
    return cond


def discard(counters: Sequence[Any], lo: Any, hi: Any, ids: Sequence[Any] | None) -> Any:
    """The statement removing the pending deltas of ``counters`` for parents in the range.

    Rows are deleted when the counters are all the table's buffered ones;
    otherwise only their columns are zeroed (the other counters' deltas stay).
    """
    table = _tables[counters[0].parent_table]
    where = _scope(table.c.parent_id, lo, hi, ids)
    names = {c.column.name for c in counters if is_buffered(c)}
    all_names = {c.name for c in table.columns} - RESERVED
    if names >= all_names:
        return sa.delete(table).where(where)
    return sa.update(table).where(where).values({n: 0 for n in sorted(names)})


def recount(
    connection: Connection,
    counters: Sequence[Any],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
) -> int:
    """Set ``counters`` to their truth over the range; return the rows changed.

    Buffered counters also lose their pending deltas for the range, and on
    PostgreSQL both happen in ONE statement (a data-modifying ``WITH``): one
    snapshot in which each writer's child row and delta row are either both
    visible (counted, delta removed) or both invisible (not counted, delta
    kept). Two statements would lose or double-count the writers committing
    between them. SQLite has one writer at a time, so two statements in the
    caller's transaction see the same data.
    """
    from . import sql  # sql builds the recount; it imports this module for cached values

    stmt = sql.recount_range(counters, lo, hi, ids=ids)
    if not any(is_buffered(c) for c in counters):
        return int(connection.execute(stmt).rowcount)
    check_dialect(connection, counters[0].parent_table)
    gone = discard(counters, lo, hi, ids)
    if connection.dialect.name == "postgresql":
        table = _tables[counters[0].parent_table]
        stmt = stmt.add_cte(gone.returning(table.c.id).cte("discarded"))
        return int(connection.execute(stmt).rowcount)
    connection.execute(gone)
    return int(connection.execute(stmt).rowcount)


def split(
    parent: sa.Table, deltas: Mapping[Any, Mapping[sa.Column[Any], Any]]
) -> tuple[dict[Any, dict[sa.Column[Any], Any]], dict[Any, dict[sa.Column[Any], Any]]]:
    """Split per-parent deltas into (unbuffered, buffered) by counter column."""
    table = _tables.get(parent)
    plain: dict[Any, dict[sa.Column[Any], Any]] = {}
    buffered: dict[Any, dict[sa.Column[Any], Any]] = {}
    for pid, ds in deltas.items():
        for col, d in ds.items():
            target = buffered if table is not None and col.name in table.c else plain
            target.setdefault(pid, {})[col] = d
    return plain, buffered
