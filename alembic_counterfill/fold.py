"""Fold: move pending deltas of buffered counters into their columns, a few parents at a time.

One transaction per chunk of parents (DESIGN.md section 3, "Hot parents"):

1. pick up to ``chunk`` parents with pending deltas, in key order;
2. lock them (``FOR NO KEY UPDATE`` in key order on PostgreSQL, as writers of
   unbuffered counters and backfill batches do: no deadlock between them);
3. in ONE statement (:func:`.sql.fold_moved`), delete those parents' delta
   rows and add what the statement deleted to the columns. Exactly the
   deleted rows are added: a delta committed meanwhile is either deleted and
   added, or left for the next fold. SQLite (one writer) adds, then deletes,
   in one transaction.

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

from . import buffer, innodb, innodb_deltas, sql

log = logging.getLogger("alembic_counterfill.fold")

#: Parents folded per transaction.
CHUNK = buffer.FOLD_CHUNK


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
    with engine.connect() as conn:
        return fold_on(conn, parent, chunk=chunk, ids=ids)


def fold_on(
    conn: Connection, parent: sa.Table, *, chunk: int = CHUNK, ids: Sequence[Any] | None = None
) -> FoldOutcome:
    """:func:`fold_table` on the caller's connection (no transaction open): one commit per chunk.

    The inline folder of an ``AsyncSession`` app runs it through
    ``AsyncConnection.run_sync``.
    """
    if innodb.is_innodb(conn.dialect):  # no gap locks; fresh reads (docs/databases.md)
        conn.execution_options(isolation_level=innodb.ISOLATION)
    total = FoldOutcome()
    while True:
        try:
            done = fold_chunk(conn, parent, chunk, ids=ids)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
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
    chosen = list(conn.execute(sql.pending_parents(deltas, chunk, ids)).scalars())
    if not chosen:
        return FoldOutcome()
    dialect = conn.dialect.name
    pk = next(iter(parent.primary_key.columns))
    if innodb.is_innodb(conn.dialect):
        innodb.lock_parents(conn, parent, pk, None, None, ids=chosen)
        count, oldest = innodb_deltas.fold_locked(conn, parent, deltas, chosen)
        lags = [] if oldest is None else [_age(oldest)]
        return FoldOutcome(parents=len(chosen), deltas=count, transactions=1, lags=lags)
    if dialect != "sqlite":  # SQLite has one writer at a time already
        conn.execute(sql.lock_parents(parent, pk, None, None, ids=chosen, dialect=dialect))
    count, oldest = 0, None
    for stmt in sql.fold_moved(parent, deltas, chosen, dialect):
        result = conn.execute(stmt)
        if result.returns_rows:
            count, oldest = result.one()
    lags = []
    if oldest is not None:
        lags.append(_age(oldest))
    return FoldOutcome(parents=len(chosen), deltas=int(count), transactions=1, lags=lags)


def _age(created_at: dt.datetime) -> float:
    if created_at.tzinfo is None:  # SQLite's CURRENT_TIMESTAMP is naive UTC
        created_at = created_at.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (dt.datetime.now(dt.timezone.utc) - created_at).total_seconds())


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
    count, oldest = conn.execute(sql.pending_summary(deltas)).one()
    return Pending(parent.name, int(count), None if oldest is None else _age(oldest))
