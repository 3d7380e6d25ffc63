"""How InnoDB statements reach the rows they lock: through the primary key, or one chosen index.

InnoDB locks every index entry a locking statement passes, so the path a
statement takes decides which rows it waits for. Left to choose, MariaDB
scans a small table, and reaches a keyless table's rows through whichever
foreign-key index its statistics favour: locks out of key order, and
deadlocks (docs/databases.md). The forms here name the path: ``FORCE INDEX
(PRIMARY)``, a ``JSON_TABLE`` of the keys joined first (``STRAIGHT_JOIN``),
and, for a table without a primary key, one foreign-key index every writer
goes through (:func:`keyless_access`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import Join
from sqlalchemy.sql.visitors import InternalTraversal

from . import buffer

#: On a small table InnoDB may answer ``pk IN (...)`` with a full scan, which
#: under a locking read or UPDATE locks every row it passes, parents we never
#: asked for included, and so breaks the key order that keeps writers free of
#: deadlocks. The primary key's range access locks exactly the keys listed.
BY_PRIMARY_KEY = "FORCE INDEX (PRIMARY)"


class ValuesFirst(Join):
    """``right STRAIGHT_JOIN left FORCE INDEX (PRIMARY) ON …``: drive the join from ``right``.

    Built like ``left.join(right)``, so that an ``UPDATE`` over it updates
    ``left``; rendered with ``right`` first, so that the server reads the delta
    rows first and reaches each parent through its primary key. Left to
    choose, MariaDB scans a small parent table instead (without the index
    hint, even after ``STRAIGHT_JOIN``), and the scan waits for and locks
    parents that are not ours, in table order: deadlocks.
    """

    inherit_cache = True


class ValuesFirstBy(ValuesFirst):
    """:class:`ValuesFirst` reaching ``left`` through the index hint ``hint`` instead."""

    inherit_cache = True
    _traverse_internals = [*Join._traverse_internals, ("hint", InternalTraversal.dp_string)]

    def __init__(self, left: Any, right: Any, onclause: Any, hint: str) -> None:
        super().__init__(left, right, onclause)
        self.hint = hint


@compiles(ValuesFirst)
@compiles(ValuesFirstBy)
def _values_first(element: ValuesFirst, compiler: Any, **kw: Any) -> str:
    kw["asfrom"] = True
    right = compiler.process(element.right, **kw)
    hint = getattr(element, "hint", BY_PRIMARY_KEY)
    left = f"{compiler.process(element.left, **kw)} {hint}"
    return f"{right} STRAIGHT_JOIN {left} ON {compiler.process(element.onclause, **kw)}"


class _Through(ColumnElement[bool]):
    """``TRUE`` in a DELETE's WHERE that makes ``join`` the DELETE's ``USING`` clause.

    SQLAlchemy gathers a DELETE's other tables from its WHERE, and renders a
    join that holds the deleted table as the whole ``USING`` clause.
    """

    inherit_cache = True
    _traverse_internals = [("join", InternalTraversal.dp_clauseelement)]
    type = sa.Boolean()

    def __init__(self, join: Join) -> None:
        self.join = join

    @property
    def _from_objects(self) -> list[Any]:
        return [self.join]


@compiles(_Through)
def _through(element: _Through, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(sa.true(), **kw))


def delete_through_keys(
    stmt: Any, columns: Sequence[sa.Column[Any]], keys: Sequence[Any], hint: str = BY_PRIMARY_KEY
) -> Any:
    """``stmt`` (a DELETE) reaching exactly the rows ``keys`` by primary key; ``None`` if it cannot.

    ``DELETE FROM t USING JSON_TABLE(:keys) STRAIGHT_JOIN t FORCE INDEX
    (PRIMARY) ON …``: the server reads the keys first and reaches each row
    through the primary key (``eq_ref``), whatever its statistics say. A
    single-table ``DELETE … WHERE pk IN (…)`` takes no index hint, and when
    it names about as many keys as the table's estimated rows MariaDB runs
    it as a table scan, which waits for rows other transactions hold that
    the DELETE spares. Integer keys only (``BIGINT`` columns of the JSON
    rows); the caller keeps the key list otherwise, and for a DELETE with
    its own ``RETURNING``, which MariaDB allows on one table only. ``hint``
    names another index when ``columns`` are not the primary key
    (:func:`keyless_access`).
    """
    if not all(isinstance(c.type, sa.Integer) for c in columns):
        return None
    if not all(type(v) is int for key in keys for v in key) or not _renders_using_join():
        return None
    stmt = stmt._clone()
    stmt._where_criteria = (_Through(_keys_first(columns, keys, hint)),)
    return stmt


def _keys_first(columns: Sequence[sa.Column[Any]], keys: Sequence[Any], hint: str) -> Join:
    """``JSON_TABLE(:counterfill_keys) STRAIGHT_JOIN table <hint> ON column<i> = k<i> …``."""
    spec = ", ".join(f"k{i} BIGINT PATH '$[{i}]'" for i in range(len(columns)))
    rows = (
        sa.func.json_table(
            sa.bindparam("counterfill_keys", json.dumps([list(k) for k in keys]), sa.String),
            sa.literal_column(f"'$[*]' COLUMNS ({spec})"),
        )
        .table_valued(*[f"k{i}" for i in range(len(columns))])
        .alias("counterfill_keys")
    )
    on = sa.and_(*[c == rows.c[f"k{i}"] for i, c in enumerate(columns)])
    table = columns[0].table
    if hint == BY_PRIMARY_KEY:
        return ValuesFirst(table, rows, on)
    return ValuesFirstBy(table, rows, on, hint)


@lru_cache(maxsize=1)
def _renders_using_join() -> bool:
    """Whether SQLAlchemy renders a ``USING`` join holding the DELETE's table as the whole clause.

    Older 2.0 releases put the table in front of it as well (``USING t, …
    STRAIGHT_JOIN t …``), which MariaDB refuses (a table named twice); the
    key-list form is kept there.
    """
    from sqlalchemy.dialects import mysql

    t = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    stmt = sa.delete(t).where(_Through(_keys_first([t.c.id], [(1,)], BY_PRIMARY_KEY)))
    return "USING t," not in str(stmt.compile(dialect=mysql.dialect()))


def keyless_access(
    connection: Connection,
    table: sa.Table,
    counters: Sequence[Any],
    named: Sequence[sa.Column[Any]],
) -> str | None:
    """``FORCE INDEX`` of the one index every locking statement on a keyless table goes through.

    Without a primary key InnoDB reaches rows through a secondary index (or
    its hidden row id, which SQL cannot name), and locks every entry it
    passes. Unlinking ``(post 14, tag 1)`` through the ``tag_id`` index
    passes, and waits for, the hot tag's links of every other writer, who
    then wait for our row: a deadlock. Through the index of a parent the
    writers do not share, each reads and locks only its own links. That
    parent is taken to be one whose counters are all unbuffered (its
    writers queue on its exclusive lock before any link write), else the
    first counted foreign key in column order (``post_id`` of
    ``post_tags``). Only foreign keys the statement names by equality
    (``named``) are candidates: an index the WHERE cannot narrow would be
    read whole. ``None`` with a primary key, or without such an index.

    The indexes are those the ``MetaData`` declares, else those the server
    has (:func:`_server_indexes`): InnoDB creates an index for every foreign
    key that has none, which models usually do not declare.
    """
    if table.primary_key.columns:
        return None
    equal = {c.name for c in named}
    fks = {c.fk.name: c.fk for c in counters if c.fk.name in equal}
    buffered = {c.fk.name for c in counters if buffer.is_buffered(c)}
    ordered = [c for c in table.columns if c.name in fks]
    declared = [
        (str(index.name), first.name)
        for index in table.indexes
        if index.name and (first := next(iter(index.columns), None)) is not None
    ]
    for indexes in (declared, None):
        if indexes is None:
            indexes = _server_indexes(connection, table)
        for column in sorted(ordered, key=lambda c: c.name in buffered):  # stable: column order
            for name, first_column in indexes:
                if first_column == column.name:
                    quoted = connection.dialect.identifier_preparer.quote(name)
                    return f"FORCE INDEX ({quoted})"
    return None


#: (server, database, table) -> (index name, first column) of the indexes the server has.
_reflected: dict[tuple[str, str | None, str], list[tuple[str, str]]] = {}


def _server_indexes(connection: Connection, table: sa.Table) -> list[tuple[str, str]]:
    """The table's indexes as the server has them, read once per process (name, first column).

    Reflection (``SHOW CREATE TABLE``) does not end the transaction; a
    keyless table's indexes change only by DDL, which a running application
    does not race.
    """
    url = connection.engine.url
    key = (url.render_as_string(hide_password=True), table.schema or url.database, table.name)
    found = _reflected.get(key)
    if found is None:
        indexes = sa.inspect(connection).get_indexes(table.name, schema=table.schema)
        found = _reflected[key] = [
            (str(ix["name"]), str(ix["column_names"][0]))
            for ix in indexes
            if ix["name"] and ix["column_names"] and ix["column_names"][0]
        ]
    return found
