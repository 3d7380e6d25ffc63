"""Pending deltas of buffered counters on InnoDB: discard them for a recount, fold them.

PostgreSQL does both in one data-modifying statement (``DELETE … RETURNING``
inside a ``WITH``); InnoDB has neither, so each is a locking read of the
delta rows, then writes by primary key. Every read goes through the deltas
table's ``parent_id`` index and every DELETE names its rows (``LIMIT``): a
scan, or a range read one record too far, would wait for other parents'
writers, who may wait for a parent the caller holds (docs/databases.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import buffer, innodb
from .errors import CounterfillError


def _delete_by_id(connection: Connection, deltas_table: sa.Table, ids: Sequence[Any]) -> int:
    """Delete the delta rows ``ids`` (locked by this transaction) without touching any other row.

    A range read on the primary key reads one record past its last key, and
    a DELETE (unlike an UPDATE, which skips rows it would not match) waits
    for that record's lock: often a writer's uncommitted delta row, whose
    writer may wait for a parent we hold. ``LIMIT len(ids)`` ends the scan
    on the last of our rows.
    """
    d, deleted = deltas_table, 0
    for start in range(0, len(ids), innodb.CHUNK):
        part = sorted(ids[start : start + innodb.CHUNK])
        stmt = sa.delete(d).where(d.c.id.in_(part)).with_dialect_options(mysql_limit=len(part))
        deleted += connection.execute(stmt).rowcount
    return deleted


def discard_locked(
    connection: Connection,
    counters: Sequence[Any],
    lo: Any,
    hi: Any,
    ids: Sequence[Any] | None = None,
    *,
    read_committed: bool = False,
) -> int:
    """Remove the pending deltas of ``counters`` for the parents in ``[lo, hi)`` (or ``ids``).

    For recounts (batches, ``verify --fix``, bulk statements): the caller
    holds those parents exclusively, so no new delta row can appear for them
    until it commits, and after this the column alone is the cached value.
    The rows are found with a locking read through the ``parent_id`` index
    and removed by primary key (see :func:`_by_parent`): rows deleted when
    the counters are all of the table's buffered ones, else only their
    columns zeroed. Returns the rows touched (0 when no counter is buffered).

    ``read_committed``: the caller's transaction runs at ``READ COMMITTED``
    (backfill batches). The rows are then found by a plain read, which sees
    every one of them: each writer held a shared lock on its parent until its
    delta row committed, and no new one can come while the caller holds the
    parent. A locking range read would also lock the first delta row past
    the range, which belongs to the next batch's parents: two batches
    next to each other would deadlock (each holds the other's first row).
    At ``REPEATABLE READ`` a plain read could miss rows committed after the
    snapshot, so the read locks.
    """
    names = sorted({c.column.name for c in counters if buffer.is_buffered(c)})
    if not names:
        return 0
    parent = counters[0].parent_table
    d = buffer.deltas_of(parent)
    assert d is not None
    stmt = sa.select(d.c.id).where(innodb.scope(d.c.parent_id, lo, hi, ids))
    hint = _by_parent(connection, d)
    if hint:
        stmt = stmt.with_hint(d, hint)
    if not read_committed:
        stmt = stmt.with_for_update()
    found = sorted(connection.execute(stmt).scalars())
    if not found:
        return 0
    if set(names) >= set(buffer.counter_names(parent)):
        return _delete_by_id(connection, d, found)
    touched = 0
    for start in range(0, len(found), innodb.CHUNK):
        part = found[start : start + innodb.CHUNK]
        stmt_u = (
            sa.update(d)
            .where(d.c.id.in_(part))
            .values({n: 0 for n in names})
            .with_dialect_options(mysql_limit=len(part))
        )
        touched += connection.execute(stmt_u).rowcount
    return touched


def _by_parent(connection: Connection, deltas_table: sa.Table) -> str | None:
    """``FORCE INDEX`` of the deltas table's ``parent_id`` index (``None`` if it has none).

    A locking read that scans the whole (small) deltas table would wait for
    every uncommitted delta row, other parents' writers included, and they
    may wait for the parents the fold holds: a deadlock. Through the index,
    it reads, and locks, only the rows of the parents it holds.
    """
    for index in deltas_table.indexes:
        if [c.name for c in index.columns] == ["parent_id"] and index.name:
            quoted = connection.dialect.identifier_preparer.quote(str(index.name))
            return f"FORCE INDEX ({quoted})"
    return None


def fold_locked(
    connection: Connection, parent: sa.Table, deltas_table: sa.Table, chosen: Sequence[Any]
) -> tuple[int, Any]:
    """Fold the pending deltas of parents ``chosen``, which the caller has locked exclusively.

    Return ``(deltas moved, oldest created_at)``. InnoDB has no
    ``DELETE … RETURNING`` in a data-modifying ``WITH``, so: a locking read
    of the parents' delta rows through the ``parent_id`` index (it reads the
    latest committed rows at any isolation level), one ``CASE`` UPDATE adding
    their sums, and a DELETE of those rows by primary key (a DELETE by
    ``parent_id`` may scan the table and wait for other parents' writers).
    Nothing can change in between: a new delta row needs a shared lock on its
    parent for its foreign-key check, and the caller holds the exclusive one.
    The DELETE's rowcount is checked anyway; a mismatch raises, and the
    caller's transaction rolls back whole.
    """
    pk = next(iter(parent.primary_key.columns))
    names = buffer.counter_names(parent)
    d = deltas_table
    sums: dict[Any, dict[sa.Column[Any], Any]] = {}
    ids: list[Any] = []
    oldest = None
    for start in range(0, len(chosen), innodb.CHUNK):
        part = sorted(chosen)[start : start + innodb.CHUNK]
        stmt = sa.select(d.c.id, d.c.parent_id, d.c.created_at, *[d.c[n] for n in names])
        hint = _by_parent(connection, d)
        if hint:
            stmt = stmt.with_hint(d, hint)
        rows = connection.execute(
            stmt.where(d.c.parent_id.in_(part)).order_by(d.c.id).with_for_update()
        ).all()
        for row in rows:
            ids.append(row[0])
            if oldest is None or row[2] < oldest:
                oldest = row[2]
            per = sums.setdefault(row[1], {})
            for i, n in enumerate(names):
                if row[3 + i]:
                    per[parent.c[n]] = per.get(parent.c[n], 0) + row[3 + i]
    count = len(ids)
    changes = {pid: {c: v for c, v in per.items() if v} for pid, per in sums.items()}
    changes = {pid: per for pid, per in changes.items() if per}
    if changes:
        innodb.apply_deltas(connection, parent, pk, changes)
    deleted = _delete_by_id(connection, d, ids)
    if deleted != count:
        raise CounterfillError(
            f"{parent.name}: the fold read {count} delta rows but deleted {deleted}; "
            "it was rolled back, nothing changed: run `alembic counterfill fold` again"
        )
    return count, oldest
