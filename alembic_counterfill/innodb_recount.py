"""InnoDB backfill recount of a key range: grouped truths staged on the server, one UPDATE … JOIN.

The caller holds the range's parents exclusively (:func:`.innodb.lock_parents`),
at ``READ COMMITTED``. Then, per child table and FK, one
``INSERT INTO <private temporary table> SELECT fk, COUNT/SUM … GROUP BY fk``
stages the true values, and one multi-table
``UPDATE parent LEFT JOIN stage … SET c = truth WHERE c <> truth`` writes the
parents that differ. Nothing travels to the client but a row count.

Why this shape and not another (figures in docs/performance.md):

- InnoDB reads the source of an ``INSERT … SELECT`` as a consistent read,
  locking nothing, at ``READ COMMITTED``; a multi-table ``UPDATE`` that joins
  the child tables directly would take shared locks on the child rows it
  reads, waiting for writers that wait for our parents: a deadlock. The
  UPDATE here joins only the private table, whose rows no one else sees.
- One grouped range scan per FK index, not one join of the parents to every
  grouped child table: MariaDB plans such joins as ``LATERAL DERIVED``,
  evaluated again for every parent.
- Nothing is fetched into Python: the earlier SELECT-then-write form spent
  most of a batch converting and sending back 10,000 rows per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import sql

#: Prefix of the private staging tables (``CREATE TEMPORARY TABLE``: per
#: connection, invisible to other sessions). One per shape of counters, kept
#: for the pooled connection's life and emptied after each use.
STAGE = "counterfill_stage"

#: Staged rows up to which the table lives in memory (``ENGINE=MEMORY``, 60 to
#: 150 bytes a row with its hash index: at most 7.5 MB, inside the server's
#: default 16 MB ``max_heap_table_size``); larger batches stage in InnoDB,
#: which has no such bound. A 10,000-parent batch with five FKs stays in memory.
MEMORY_ROWS = 50_000

_STAGES = "counterfill.stage_tables"


def _groups(counters: Sequence[Any]) -> list[tuple[sa.Column[Any], list[int]]]:
    """Counters that share a child table and FK, which one grouped scan serves."""
    groups: dict[tuple[sa.Table, sa.Column[Any]], list[int]] = {}
    for i, counter in enumerate(counters):
        groups.setdefault((counter.child_table, counter.fk), []).append(i)
    return [(fk, members) for (_, fk), members in groups.items()]


def _aggregate(counter: Any) -> sa.ColumnElement[Any]:
    plain = counter.summed is None and counter.where is None
    return sa.func.count() if plain else sa.func.sum(sql.contribution(counter))


def _stage(connection: Connection, counters: Sequence[Any], engine: str) -> sa.Table:
    """This connection's empty staging table for ``counters``' types, created on first use."""
    pk = counters[0].parent_pk
    columns = [
        sa.Column("g", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("k", pk.type, primary_key=True, autoincrement=False),
        *[sa.Column(f"n{i}", c.column.type, nullable=True) for i, c in enumerate(counters)],
    ]
    dialect = connection.dialect
    shape = "|".join([engine, *[str(c.type.compile(dialect)) for c in columns]])
    # The name is derived from the shape only (hex digits): no input reaches it.
    name = f"{STAGE}_{hashlib.sha1(shape.encode()).hexdigest()[:12]}"
    stage = sa.Table(name, sa.MetaData(), *columns, prefixes=["TEMPORARY"], mysql_engine=engine)
    made: set[str] = connection.info.setdefault(_STAGES, set())
    if name not in made:
        # A temporary table of this name outlives a failed batch on a pooled
        # connection whose info was reset: start from a fresh one.
        connection.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {name}")
        stage.create(connection)
        made.add(name)
    return stage


def recount_range(
    connection: Connection, counters: Sequence[Any], lo: Any, hi: Any, *, parents: int
) -> int:
    """Set the counters of the locked parents in ``[lo, hi)`` to their truth; return rows changed.

    Three statements: one ``INSERT … SELECT`` staging every group's truths
    (``UNION ALL``), the ``UPDATE … JOIN``, and a ``DELETE`` emptying the stage.

    :param parents: how many parents the range holds (what the lock counted),
        which chooses where the stage lives.
    """
    table, pk = counters[0].parent_table, counters[0].parent_pk
    groups = _groups(counters)
    stage = _stage(
        connection, counters, "MEMORY" if parents * len(groups) <= MEMORY_ROWS else "InnoDB"
    )
    target: Any = table  # parent LEFT JOIN stage g0 LEFT JOIN stage g1 …
    truths: dict[int, sa.ColumnElement[Any]] = {}
    selects = []
    for g, (fk, members) in enumerate(groups):
        values = [
            _aggregate(counters[i]) if i in members else sa.null() for i in range(len(counters))
        ]
        selects.append(
            sa.select(sa.literal(g, sa.SmallInteger), fk, *values)
            .where(fk.is_not(None), sql.key_range(fk, lo, hi))
            .group_by(fk)
        )
        staged = stage.alias(f"g{g}")
        target = target.outerjoin(staged, sa.and_(staged.c.g == g, staged.c.k == pk))
        for i in members:
            truths[i] = sa.func.coalesce(staged.c[f"n{i}"], 0)
    grouped = selects[0] if len(selects) == 1 else sa.union_all(*selects)
    names = ["g", "k", *[f"n{i}" for i in range(len(counters))]]
    wrong = [c.column.is_distinct_from(truths[i]) for i, c in enumerate(counters)]
    update = (
        sa.update(target)
        .values({c.column: truths[i] for i, c in enumerate(counters)})
        .where(sql.key_range(pk, lo, hi), sa.or_(*wrong))
    )
    try:
        connection.execute(sa.insert(stage).from_select(names, grouped))
        # SQLAlchemy's MySQL drivers report matched rows; matched means differing here.
        changed = connection.execute(update).rowcount
    except BaseException:
        # MEMORY rows survive a rollback: drop and recreate the stage on next use
        # (no statement here, on a connection that may have just failed).
        connection.info.get(_STAGES, set()).discard(stage.name)
        raise
    connection.execute(sa.delete(stage))
    return int(changed)
