"""Database signals a backfill backs off on (PostgreSQL): lock waiters, autovacuum, replica lag.

Each check is one catalog query returning a short reason when the backfill
should slow down, or ``None``. Other databases report nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Defaults of the throttle settings (config keys of the same names).
LOCK_TIMEOUT_MS = 2_000
MAX_REPLICA_LAG_SECONDS = 30.0

#: Seconds between checks of autovacuum and replica lag by one worker process.
HEALTH_EVERY = 5.0

_health = {"due": 0.0}
_health_lock = threading.Lock()


@dataclass(frozen=True)
class Throttle:
    """Which signals a backfill obeys; ``0``/``None`` turns a check off.

    :param lock_timeout_ms: longest wait for a batch's parent-row locks; past
        it the batch gives way (rolls back, backs off, shrinks) instead of
        queueing application writes behind it.
    :param lock_waiters: back off when sessions wait on a batch's locks.
    :param autovacuum: pause while a vacuum (autovacuum or manual) works on the parent table.
    :param max_replica_lag_seconds: pause while a replica lags more than this.
    """

    lock_timeout_ms: int = LOCK_TIMEOUT_MS
    lock_waiters: bool = True
    autovacuum: bool = True
    max_replica_lag_seconds: float | None = MAX_REPLICA_LAG_SECONDS


def lock_waiters(conn: Connection) -> str | None:
    """Sessions waiting on locks this connection's transaction holds, as a reason (or None)."""
    if conn.dialect.name != "postgresql":
        return None
    return waiters_reason(conn.execute(sa.select(waiters_count())).scalar_one())


def waiters_count() -> sa.ScalarSelect[Any]:
    """PostgreSQL: how many sessions wait on this transaction's locks, as a scalar subquery.

    A batch adds it to a statement it sends anyway (one round trip fewer
    while its parents are locked); :func:`waiters_reason` words the count.
    """
    act = sa.table("pg_stat_activity", sa.column("pid"))
    # Statistics views are snapshotted at their first use in a transaction;
    # a batch asks once, just before committing, so its snapshot is fresh.
    return (
        sa.select(sa.func.count())
        .select_from(act)
        .where(
            sa.func.array_position(
                sa.func.pg_blocking_pids(act.c.pid), sa.func.pg_backend_pid()
            ).is_not(None)
        )
        .scalar_subquery()
    )


def waiters_reason(n: int | None) -> str | None:
    """The throttle reason for ``n`` waiting sessions (None for none)."""
    return f"{n} session(s) waited on the batch's locks" if n else None


def autovacuum(conn: Connection, table: sa.Table) -> str | None:
    """Whether a vacuum (autovacuum or a manual ``VACUUM``) is processing ``table``, as a reason.

    Both count: either way the table is being cleaned of dead rows, and a
    backfill rewriting rows meanwhile makes more of them and competes for the
    same I/O, so backing off lets the vacuum finish sooner. ``VACUUM FULL``
    is not listed (it locks the table, so batches wait on it anyway).
    """
    if conn.dialect.name != "postgresql":
        return None
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    vac = sa.table("pg_stat_progress_vacuum", sa.column("pid"), sa.column("relid"))
    act = sa.table("pg_stat_activity", sa.column("pid"), sa.column("backend_type"))
    kind = conn.execute(
        sa.select(act.c.backend_type)
        .select_from(vac.join(act, act.c.pid == vac.c.pid))
        .where(vac.c.relid == sa.func.to_regclass(sa.literal(name, sa.Text)))
        .order_by(act.c.backend_type)
        .limit(1)
    ).scalar()
    if kind is None:
        return None
    what = "autovacuum" if kind == "autovacuum worker" else "VACUUM"
    return f"{what} is running on {table.name}"


def replica_lag(conn: Connection, bound: float) -> str | None:
    """The largest replay lag of this primary's replicas if above ``bound`` seconds (or None)."""
    if conn.dialect.name != "postgresql":
        return None
    rep = sa.table("pg_stat_replication", sa.column("replay_lag", sa.Interval))
    lag = conn.execute(sa.select(sa.func.max(sa.extract("epoch", rep.c.replay_lag)))).scalar()
    if lag is not None and float(lag) > bound:
        return f"replica lag {float(lag):.1f}s above {bound:g}s"
    return None


def health(conn: Connection, table: sa.Table, throttle: Throttle) -> str | None:
    """The first reason to pause between batches (autovacuum, replica lag), or None."""
    if throttle.autovacuum:
        reason = autovacuum(conn, table)
        if reason:
            return reason
    if throttle.max_replica_lag_seconds:
        return replica_lag(conn, throttle.max_replica_lag_seconds)
    return None


def health_check_due(now: float) -> bool:
    """Whether this process should check :func:`health` at monotonic time ``now``.

    At most once per :data:`HEALTH_EVERY` per process (all threads), and at
    once in a fresh process. Process-wide rather than per delivery: most
    deliveries end well within the interval, so a per-delivery clock would
    never check at all.
    """
    with _health_lock:
        if now < _health["due"]:
            return False
        _health["due"] = now + HEALTH_EVERY
        return True


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's ``lock_timeout`` firing (SQLSTATE 55P03)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "55P03"
