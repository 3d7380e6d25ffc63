"""An independent drift check: every counter against its own correlated COUNT/SUM.

Public through :mod:`.testing`; it lives here so that :mod:`.machine` can use
it without importing :mod:`.testing` (which loads the machine on demand).
"""

from __future__ import annotations

import decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.sql.util import ClauseAdapter

from . import sql
from .counters import Counter, counters_of


class Drift(tuple[str, Any, str, Any, Any]):
    """One wrong counter value: ``(table, id, column, cached, actual)``."""

    __slots__ = ()

    def __str__(self) -> str:
        table, pid, column, cached, actual = self
        return f"{table} id={pid!r} {column}: cached {cached!r}, actual {actual!r}"


def _truth(counter: Counter) -> sa.ScalarSelect[Any]:
    c = counter
    # Alias the child so self-referential counters (users.referrer_id -> users.id)
    # correlate to the outer parent row instead of to themselves.
    child = c.child_table.alias("child")
    adapt = ClauseAdapter(child).traverse
    cond: Any = adapt(c.fk) == c.parent_pk
    if c.where is not None:
        cond = sa.and_(cond, adapt(c.where))
    agg = (
        sa.func.count()
        if c.summed is None
        else sa.func.coalesce(sa.func.sum(adapt(c.summed_value)), 0)
    )
    return sa.select(agg).select_from(child).where(cond).scalar_subquery()


def find_drift(bind: sa.Engine | sa.Connection | Session, target: Any) -> list[Drift]:
    """Every counter value that differs from its true COUNT/SUM, ordered by table, id, column."""
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return find_drift(conn, target)
    found: list[Drift] = []
    counters = counters_of(target)
    for c in counters:
        truth = _truth(c)
        cached = sql.cached_value(c)  # buffered counters: column + pending deltas
        stmt = (
            sa.select(c.parent_pk, cached, truth)
            .where(cached.is_distinct_from(truth))
            .order_by(c.parent_pk)
        )
        for pid, cached, actual in bind.execute(stmt):
            found.append(Drift((c.parent_table.name, pid, c.column.name, cached, _whole(actual))))
    return sorted(found, key=lambda d: (d[0], str(d[1]), d[2]))


def _whole(value: Any) -> Any:
    # MariaDB/MySQL (and PostgreSQL for bigint) return SUM as a Decimal; show whole values as ints.
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def assert_counters_consistent(bind: sa.Engine | sa.Connection | Session, target: Any) -> None:
    """Raise AssertionError listing every counter that differs from the truth.

    :param bind: an Engine, Connection or Session on the database to check.
    :param target: the declarative base, registry or MetaData declaring the counters.
    """
    drift = find_drift(bind, target)
    if drift:
        lines = "\n".join(f"  {d}" for d in drift[:50])
        more = f"\n  ... and {len(drift) - 50} more" if len(drift) > 50 else ""
        raise AssertionError(f"{len(drift)} counter value(s) drifted:\n{lines}{more}")
