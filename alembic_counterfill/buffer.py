"""Buffered (hot-parent) counters: the registry of insert-only deltas tables.

A counter declared with ``counter_cache(..., buffered=True)`` is not updated in
the writer's transaction. The writer appends one row per parent to the parent
table's deltas table instead (``counterfill_deltas_<table>``: ``parent_id``, one
column per buffered counter of that table, ``created_at``): an insert touches
no shared row, so writers of one popular parent no longer queue on its row
lock. :mod:`.fold` later moves pending deltas into the columns. An exact value
is the column plus the parent's pending deltas, read in one statement (one
snapshot): a writer's child row and its delta row commit together.

The deltas table lives in the parent table's own ``MetaData``, built when the
counter column is attached to its table (:mod:`.events` registers the two
hooks below), so ``metadata.create_all()`` and Alembic autogenerate create it
like any other table of the app. Statements over it are built in :mod:`.sql`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from .errors import CounterDeclarationError, DatabaseError

#: Prefix of every deltas table's name.
PREFIX = "counterfill_deltas_"

#: Column names of a deltas table that are not counters.
RESERVED = frozenset({"id", "parent_id", "created_at"})

#: Parents folded per transaction (``fold --chunk``'s default; here so the
#: CLI shows it without importing :mod:`.fold`).
FOLD_CHUNK = 1000

# parent table -> its deltas table; parent table -> counter columns waiting for the parent's key
_tables: dict[sa.Table, sa.Table] = {}
_waiting: dict[sa.Table, list[sa.Column[Any]]] = {}


class Now(FunctionElement[Any]):
    """``CURRENT_TIMESTAMP``; on MariaDB/MySQL ``(UTC_TIMESTAMP(6))``: UTC, microseconds.

    Their ``CURRENT_TIMESTAMP`` is in the session's time zone and, in a
    ``DATETIME``, whole seconds; the fold lag is read as naive UTC.
    """

    type = sa.DateTime()
    inherit_cache = True
    name = "current_timestamp"


@compiles(Now)
def _now(element: Now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(Now, "mysql")
@compiles(Now, "mariadb")
def _now_micro(element: Now, compiler: Any, **kw: Any) -> str:
    return "(UTC_TIMESTAMP(6))"


def table_name(parent: sa.Table) -> str:
    """The deltas table's name for ``parent``, kept within PostgreSQL's 63-character limit."""
    name = PREFIX + parent.name
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(parent.name.encode()).hexdigest()[:8]
    return f"{name[:54]}_{digest}"


def attached(column: sa.Column[Any], table: Any) -> None:
    """``after_parent_attach`` of a buffered counter column: give it a deltas-table column."""
    if not isinstance(table, sa.Table):
        return
    if column.name in RESERVED:
        raise CounterDeclarationError(
            f"{table.name}.{column.name}: a buffered counter cannot be named {column.name!r}; "
            "rename the counter column"
        )
    _waiting.setdefault(table, []).append(column)
    _build(table)


def any_column_attached(column: sa.Column[Any], table: Any) -> None:
    """``after_parent_attach`` of every column: a primary key declared after a buffered counter."""
    if _waiting and isinstance(table, sa.Table) and table in _waiting and column.primary_key:
        _build(table)


def _build(parent: sa.Table) -> None:
    # Once the parent's single-column key is known: the deltas table references it.
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
                # MariaDB/MySQL's DATETIME keeps whole seconds unless told otherwise;
                # the fold lag (status, metrics) is measured in fractions of one.
                sa.DateTime(timezone=True).with_variant(_datetime6(), "mysql", "mariadb"),
                nullable=False,
                server_default=Now(),
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


def counter_names(parent: sa.Table) -> list[str]:
    """The buffered counter columns of ``parent`` (the deltas table's counter columns)."""
    table = _tables.get(parent)
    return [] if table is None else [c.name for c in table.columns if c.name not in RESERVED]


#: Dialects whose SQL can fold and recount buffered counters exactly.
SUPPORTED = frozenset({"postgresql", "sqlite", "mysql", "mariadb"})


def check_dialect(connection: Connection, parent: sa.Table) -> None:
    """Refuse buffered counters on databases where folds and recounts cannot be exact."""
    name = connection.dialect.name
    if name not in SUPPORTED:
        raise DatabaseError(
            f"{parent.name}: buffered counters (counter_cache(..., buffered=True)) are not "
            f"supported on {name}; declare them without buffered=True, or use PostgreSQL"
        )


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


def _datetime6() -> sa.types.TypeEngine[Any]:
    """MariaDB/MySQL's ``DATETIME(6)``.

    The MySQL dialect is imported here, when a deltas table is declared, not
    with this module, which every CLI command imports whatever the database.
    """
    from sqlalchemy.dialects import mysql

    return mysql.DATETIME(fsp=6)
