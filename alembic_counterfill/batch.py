"""Run one backfill batch: the short transaction of DESIGN.md section 3, and failure marking.

No Dramatiq here: the actor, the in-process runner and tests all call
:func:`run_batch`. A batch may be delivered any number of times, at once or
one after another; it is applied once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import progress as p
from . import sql
from .counters import Counter
from .errors import ConfigurationError, CounterfillError
from .planning import decode_key

log = logging.getLogger("alembic_counterfill.batch")


class BatchNotFound(CounterfillError):
    """A message names a batch that is not recorded (bookkeeping wiped or another database)."""


@dataclass(frozen=True)
class BatchOutcome:
    """What one delivery of a batch did."""

    batch_id: int
    run_id: int
    applied: bool  # False: it was already done, nothing was written
    rows_changed: int = 0
    run_finished: bool = False  # this batch completed its run
    seconds: float = 0.0


def _run_counters(counters: Mapping[str, Counter], keys: str, batch_id: int) -> list[Counter]:
    missing = [k for k in keys.split(",") if k not in counters]
    if missing:
        raise ConfigurationError(
            f"batch {batch_id} recounts {', '.join(missing)}, which the models no longer declare; "
            "restore the declaration or run `enqueue` again to plan a new backfill"
        )
    return [counters[k] for k in keys.split(",")]


def run_batch(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_id: int,
    *,
    statement_timeout_ms: int | None = None,
) -> BatchOutcome:
    """Apply batch ``batch_id`` once, in one short transaction.

    1. lock the batch row (an ``UPDATE``, which also takes SQLite's write lock
       up front); if it is done already, stop;
    2. lock the parent range in key order (PostgreSQL), waiting for writers
       that already applied a delta to these parents;
    3. recount every counter of the run in one ``UPDATE`` (a new statement,
       so a new snapshot), writing only rows whose value differs;
    4. mark the batch done and add its figures to the run; the batch that
       brings ``batches_done`` to ``batches_total`` marks the run and its
       counters active. The run row's update serialises concurrent batches,
       so exactly one of them sees the final count.

    :param counters: declared counters by key.
    :param statement_timeout_ms: PostgreSQL ``statement_timeout`` for the
        transaction, so a batch stuck on a lock ends even inside a C call.
    """
    started = time.monotonic()
    b, r = p.batches_table, p.runs_table
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # A batch is a short statement: JIT compilation (triggered by the
            # planner's cost estimate of the recount) costs more than it saves.
            settings = {"jit": "off"}
            if statement_timeout_ms:
                settings["statement_timeout"] = str(statement_timeout_ms)
            conn.execute(sa.select(*[sa.func.set_config(k, v, True) for k, v in settings.items()]))
        row = conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id)
            .values(attempts=b.c.attempts + 1, started_at=p.now())
            .returning(b.c.state, b.c.run_id, b.c.lo, b.c.hi)
        ).first()
        if row is None:
            raise BatchNotFound(f"batch {batch_id} is not recorded in counterfill_batches")
        if row.state == p.BATCH_DONE:
            conn.rollback()
            log.info("batch %d already done; duplicate delivery ignored", batch_id)
            return BatchOutcome(batch_id, row.run_id, applied=False)
        keys = conn.execute(sa.select(r.c.counter_keys).where(r.c.id == row.run_id)).scalar_one()
        chosen = _run_counters(counters, keys, batch_id)
        table, pk = chosen[0].parent_table, chosen[0].parent_pk
        lo, hi = decode_key(pk, row.lo), decode_key(pk, row.hi)
        if conn.dialect.name != "sqlite":  # SQLite has one writer at a time already
            conn.execute(sql.lock_parents(table, pk, lo, hi))
        changed = conn.execute(sql.recount_range(chosen, lo, hi)).rowcount
        finished = _finish(
            conn, batch_id, row.run_id, was_failed=row.state == p.BATCH_FAILED, n=changed
        )
        conn.commit()
    seconds = time.monotonic() - started
    log.info(
        "batch %d %s [%s, %s) rows_changed=%d in %.3fs%s",
        batch_id,
        keys,
        "-inf" if lo is None else lo,
        "+inf" if hi is None else hi,
        changed,
        seconds,
        "; run complete" if finished else "",
    )
    return BatchOutcome(batch_id, row.run_id, True, changed, finished, seconds)


def _finish(conn: Connection, batch_id: int, run_id: int, *, was_failed: bool, n: int) -> bool:
    """Mark the batch done, add to the run's figures, complete the run if this was the last."""
    b, r, c = p.batches_table, p.runs_table, p.counters_table
    now = p.now()
    conn.execute(
        sa.update(b)
        .where(b.c.id == batch_id)
        .values(state=p.BATCH_DONE, finished_at=now, rows_changed=n, error=None)
    )
    done, failed, total = conn.execute(
        sa.update(r)
        .where(r.c.id == run_id)
        .values(
            batches_done=r.c.batches_done + 1,
            batches_failed=r.c.batches_failed - (1 if was_failed else 0),
            rows_changed=r.c.rows_changed + n,
        )
        .returning(r.c.batches_done, r.c.batches_failed, r.c.batches_total)
    ).one()
    if done >= total:
        conn.execute(sa.update(r).where(r.c.id == run_id).values(state=p.RUN_DONE, finished_at=now))
        conn.execute(
            sa.update(c)
            .where(c.c.run_id == run_id)
            .values(
                state=p.ACTIVE,
                updated_at=now,
                activated_at=sa.func.coalesce(c.c.activated_at, now),
            )
        )
        return True
    if done + failed >= total:
        _fail_run(conn, run_id, now)
    return False


def _fail_run(conn: Connection, run_id: int, now: Any) -> None:
    """Every batch has finished and some failed: the run and its counters are ``failed``."""
    r, c = p.runs_table, p.counters_table
    conn.execute(sa.update(r).where(r.c.id == run_id).values(state=p.RUN_FAILED, finished_at=now))
    conn.execute(
        sa.update(c)
        .where(c.c.run_id == run_id, c.c.state == p.BACKFILLING)
        .values(state=p.FAILED, updated_at=now)
    )


def describe(exc: BaseException) -> str:
    """A one-line description of an error for the batch row and the logs.

    Database errors are described by the driver's error (its first line), not
    SQLAlchemy's wrapper, which would repeat the whole statement.
    """
    orig = getattr(exc, "orig", None) if isinstance(exc, sa.exc.DBAPIError) else None
    cause = orig if isinstance(orig, BaseException) else exc
    lines = str(cause).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else repr(cause)
    return f"{type(cause).__name__}: {text}"[:1000]


def mark_failed(engine: sa.Engine, batch_id: int, error: str) -> bool:
    """Record that ``batch_id`` ran out of retries; return whether it was newly marked.

    A batch that is done meanwhile (a duplicate succeeded) stays done. When
    every batch of the run has finished and some failed, the run and its
    counters become ``failed``; a later ``enqueue`` retries the failed batches.
    """
    b, r = p.batches_table, p.runs_table
    now = p.now()
    with engine.connect() as conn:
        row = conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id)
            .values(error=error)
            .returning(b.c.state, b.c.run_id)
        ).first()
        if row is None or row.state == p.BATCH_DONE:
            conn.rollback()
            return False
        newly = row.state != p.BATCH_FAILED
        if newly:
            conn.execute(
                sa.update(b).where(b.c.id == batch_id).values(state=p.BATCH_FAILED, finished_at=now)
            )
            done, failed, total = conn.execute(
                sa.update(r)
                .where(r.c.id == row.run_id)
                .values(batches_failed=r.c.batches_failed + 1)
                .returning(r.c.batches_done, r.c.batches_failed, r.c.batches_total)
            ).one()
            if done + failed >= total:
                _fail_run(conn, row.run_id, now)
        conn.commit()
    log.error("batch %d failed: %s", batch_id, error)
    return newly
