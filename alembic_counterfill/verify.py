"""Verify: compare cached counters with the truth in key ranges; report or repair each drift.

Ranges are read without locks (cheap, no blocking of live traffic). A parent
that looks wrong may only be caught between a writer's child write and its
delta, so candidates are re-checked under the batch lock (``FOR NO KEY
UPDATE`` in key order, then a new statement) before they are reported or
fixed: a verify racing live writes reports no false drift.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import innodb, innodb_deltas, sql
from .counters import Counter
from .planning import next_boundary


@dataclass(frozen=True)
class Finding:
    """One cached value that differs from the truth (``fixed`` once repaired)."""

    counter: str
    table: str
    id: Any
    column: str
    cached: Any
    actual: Any
    fixed: bool = False

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ids that are not numbers become text)."""
        ident = self.id if isinstance(self.id, int | str) else str(self.id)
        return {
            "counter": self.counter,
            "table": self.table,
            "id": ident,
            "column": self.column,
            "cached": self.cached,
            "actual": self.actual,
            "fixed": self.fixed,
        }


def _number(value: Any) -> Any:
    # SUM over bigint is numeric on PostgreSQL; show integral values as ints.
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def verify(
    engine: sa.Engine,
    counters: Sequence[Counter],
    *,
    fix: bool = False,
    batch_size: int = 10_000,
    on_drift: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Check ``counters`` against COUNT/SUM over their child tables; with ``fix``, repair them.

    Each parent table is scanned once for all its counters, ``batch_size``
    parents at a time. Returns every confirmed drift (``fixed=True`` when
    repaired), also passed to ``on_drift`` as found.
    """
    groups: dict[sa.Table, list[Counter]] = {}
    for counter in counters:
        groups.setdefault(counter.parent_table, []).append(counter)
    found: list[Finding] = []
    for group in groups.values():
        group.sort(key=lambda c: c.key)
        for drift in _verify_table(engine, group, fix, batch_size):
            found.append(drift)
            if on_drift is not None:
                on_drift(drift)
    return found


def _verify_table(
    engine: sa.Engine, group: list[Counter], fix: bool, batch_size: int
) -> list[Finding]:
    pk = group[0].parent_pk
    found: list[Finding] = []
    lo = None
    while True:
        with _connect(engine) as conn:
            hi = next_boundary(conn, pk, lo, batch_size)
            candidates = [r.pk for r in conn.execute(sql.drift_rows(group, lo, hi))]
            conn.rollback()
        if candidates:
            found.extend(_recheck(engine, group, candidates, fix))
        if hi is None:
            return found
        lo = hi


def _connect(engine: sa.Engine) -> sa.Connection:
    """A connection for verify; ``READ COMMITTED`` on MariaDB/MySQL, like a batch's."""
    conn = engine.connect()
    if innodb.is_innodb(conn.dialect):
        conn.execution_options(isolation_level=innodb.ISOLATION)
    return conn


def _recheck(engine: sa.Engine, group: list[Counter], ids: list[Any], fix: bool) -> list[Finding]:
    """Confirm (and optionally repair) candidate drift while holding the parents' batch lock."""
    table, pk = group[0].parent_table, group[0].parent_pk
    out: list[Finding] = []
    with _connect(engine) as conn:
        if innodb.is_innodb(conn.dialect):
            innodb.lock_parents(conn, table, pk, None, None, ids=ids)
        elif conn.dialect.name != "sqlite":
            conn.execute(sql.lock_parents(table, pk, None, None, ids=ids))
        rows = conn.execute(sql.drift_rows(group, None, None, ids=ids)).all()
        for row in rows:
            for i, counter in enumerate(group):
                m = row._mapping
                cached, actual = _number(m[f"cached{i}"]), _number(m[f"actual{i}"])
                if cached != actual:
                    out.append(
                        Finding(counter.key, table.name, row.pk, counter.name, cached, actual, fix)
                    )
        if fix and rows:
            if innodb.is_innodb(conn.dialect):  # the truths just read, under the parents' lock
                # Buffered: their pending deltas go first, under the same locks.
                innodb_deltas.discard_locked(conn, group, None, None, [r.pk for r in rows])
                innodb.write_truths(conn, group, rows)
            else:
                # Buffered counters: the fix also removes the parents' pending deltas.
                fixed = [r.pk for r in rows]
                dialect = conn.dialect.name
                for stmt in sql.recount_statements(group, None, None, ids=fixed, dialect=dialect):
                    conn.execute(stmt)
        conn.commit()
    return out
