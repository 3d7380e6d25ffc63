"""Fold: move pending deltas of buffered counters into their columns, a few parents at a time.

One transaction per chunk of parents (DESIGN.md section 3, "Hot parents"):

1. pick up to ``chunk`` parents with pending deltas, in key order;
2. lock them (``FOR NO KEY UPDATE`` in key order on PostgreSQL, as writers of
   unbuffered counters and backfill batches do: no deadlock between them);
3. in ONE statement, delete those parents' delta rows and add what the
   statement deleted to the columns (``WITH moved AS (DELETE … RETURNING …)
   UPDATE parent … FROM (SELECT sum(…) FROM moved GROUP BY parent_id)``).
   Exactly the deleted rows are added: a delta committed meanwhile is either
   deleted and added, or left for the next fold. SQLite (one writer) adds,
   then deletes, in one transaction.

A fold killed at any point rolls back as a whole: nothing is lost or counted
twice. Two folds racing each other, writers, or a backfill stay exact.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import buffer
from .arrays import array_param

log = logging.getLogger("alembic_counterfill.fold")

#: Parents folded per transaction.
CHUNK = 1000


@dataclass
class FoldOutcome:
    """What a fold did, per parent table and in total."""

    parents: int = 0
    deltas: int = 0
    transactions: int = 0
    # Per transaction: seconds from its oldest folded delta's creation to the fold.
    lags: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: FoldOutcome) -> None:
        """Add ``other``'s figures to this one."""
        self.parents += other.parents
        self.deltas += other.deltas
        self.transactions += other.transactions
        self.lags.extend(other.lags)


def parent_tables(counters: Iterable[Any]) -> list[sa.Table]:
    """The parent tables of the buffered counters among ``counters``, by name."""
    found = {c.parent_table for c in counters if buffer.is_buffered(c)}
    return sorted(found, key=lambda t: t.name)


def fold(
    engine: sa.Engine,
    counters: Iterable[Any],
    *,
    chunk: int = CHUNK,
    ids: Sequence[Any] | None = None,
) -> FoldOutcome:
    """Fold every pending delta of the parent tables of ``counters`` (buffered ones).

    :param chunk: parents per transaction.
    :param ids: fold only these parents (the inline folder's touched ones).
    """
    started = time.monotonic()
    total = FoldOutcome()
    for parent in parent_tables(counters):
        total.add(fold_table(engine, parent, chunk=chunk, ids=ids))
    total.seconds = time.monotonic() - started
    if total.deltas:
        log.info(
            "folded %d deltas into %d parents in %d transactions (%.3fs)",
            total.deltas,
            total.parents,
            total.transactions,
            total.seconds,
        )
    return total


def fold_table(
    engine: sa.Engine, parent: sa.Table, *, chunk: int = CHUNK, ids: Sequence[Any] | None = None
) -> FoldOutcome:
    """Fold every pending delta of one parent table, ``chunk`` parents per transaction."""
    total = FoldOutcome()
    while True:
        with engine.connect() as conn:
            done = fold_chunk(conn, parent, chunk, ids=ids)
            conn.commit()
        total.add(done)
        if done.parents < chunk:
            return total


def fold_chunk(
    conn: Connection, parent: sa.Table, chunk: int, *, ids: Sequence[Any] | None = None
) -> FoldOutcome:
    """Fold the pending deltas of up to ``chunk`` parents of ``parent``; the caller commits."""
    deltas = buffer.deltas_of(parent)
    if deltas is None:
        return FoldOutcome()
    buffer.check_dialect(conn, parent)
    pk = next(iter(parent.primary_key.columns))
    pick = sa.select(deltas.c.parent_id).distinct().order_by(deltas.c.parent_id).limit(chunk)
    if ids is not None:
        pick = pick.where(deltas.c.parent_id.in_(list(ids)))
    chosen = list(conn.execute(pick).scalars())
    if not chosen:
        return FoldOutcome()
    names = [c.name for c in deltas.columns if c.name not in buffer.RESERVED]
    if conn.dialect.name == "postgresql":
        count, oldest = _fold_postgresql(conn, parent, pk, deltas, names, chosen)
    else:
        count, oldest = _fold_serial(conn, parent, pk, deltas, names, chosen)
    lags = []
    if oldest is not None:
        if oldest.tzinfo is None:  # SQLite's CURRENT_TIMESTAMP is naive UTC
            oldest = oldest.replace(tzinfo=dt.timezone.utc)
        lags.append(max(0.0, (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds()))
    return FoldOutcome(parents=len(chosen), deltas=count, transactions=1, lags=lags)


def _fold_postgresql(
    conn: Connection,
    parent: sa.Table,
    pk: sa.Column[Any],
    deltas: sa.Table,
    names: list[str],
    chosen: list[Any],
) -> tuple[int, Any]:
    ids = array_param(chosen, pk.type)
    locked = (
        sa.select(pk).where(pk == sa.any_(ids)).order_by(pk).with_for_update(key_share=True)
    ).subquery("locked")
    conn.execute(sa.select(sa.func.count()).select_from(locked))
    moved = (
        sa.delete(deltas)
        .where(deltas.c.parent_id == sa.any_(ids))
        .returning(deltas.c.parent_id, deltas.c.created_at, *[deltas.c[n] for n in names])
        .cte("moved")
    )
    sums = (
        sa.select(moved.c.parent_id, *[sa.func.sum(moved.c[n]).label(n) for n in names])
        .group_by(moved.c.parent_id)
        .subquery("sums")
    )
    added = (
        sa.update(parent)
        .values({n: parent.c[n] + sums.c[n] for n in names})
        .where(pk == sums.c.parent_id)
        .returning(pk)
        .cte("added")
    )
    stmt = (
        sa.select(sa.func.count(), sa.func.min(moved.c.created_at))
        .select_from(moved)
        .add_cte(added)
    )
    row = conn.execute(stmt).one()
    return int(row[0]), row[1]


def _fold_serial(
    conn: Connection,
    parent: sa.Table,
    pk: sa.Column[Any],
    deltas: sa.Table,
    names: list[str],
    chosen: list[Any],
) -> tuple[int, Any]:
    # One writer at a time: the UPDATE takes the write lock, so the DELETE
    # removes exactly the rows it added.
    d = deltas.alias("d")
    conn.execute(
        sa.update(parent)
        .where(pk.in_(chosen))
        .values(
            {
                n: parent.c[n]
                + sa.select(sa.func.coalesce(sa.func.sum(d.c[n]), 0))
                .where(d.c.parent_id == pk)
                .scalar_subquery()
                for n in names
            }
        )
    )
    where = deltas.c.parent_id.in_(chosen)
    count, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(deltas.c.created_at)).where(where)
    ).one()
    conn.execute(sa.delete(deltas).where(where))
    return int(count), oldest


@dataclass(frozen=True)
class Pending:
    """Pending deltas of one buffered counter's table: how many, and the oldest one's age."""

    table: str
    deltas: int
    oldest_seconds: float | None


def pending(conn: Connection, parent: sa.Table) -> Pending:
    """How many deltas of ``parent`` are pending and how old the oldest is (a cheap read)."""
    deltas = buffer.deltas_of(parent)
    if deltas is None or not sa.inspect(conn).has_table(deltas.name, schema=deltas.schema):
        return Pending(parent.name, 0, None)
    count, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(deltas.c.created_at))).one()
    age = None
    if oldest is not None:
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.timezone.utc)
        age = max(0.0, (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds())
    return Pending(parent.name, int(count), age)
