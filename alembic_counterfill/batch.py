"""Run one backfill batch: the short transaction of DESIGN.md section 3, and failure marking.

No Dramatiq here: the actor, the in-process runner and tests all call
:func:`run_batch`. A batch may be delivered any number of times, at once or
one after another; it is applied once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import definition, innodb, innodb_deltas, innodb_recount, notify, pieces, signals
from . import progress as p
from .counters import Counter
from .errors import CounterfillError, DefinitionMismatch
from .pacing import BACKOFF_SHRINK, CONTENDED_SECONDS, History, Pacing
from .pacing import next_size as next_size_after
from .planning import decode_key, encode_key, key_text, next_boundary
from .signals import Throttle

log = logging.getLogger("alembic_counterfill.batch")


class BatchNotFound(CounterfillError):
    """A message names a batch that is not recorded (bookkeeping wiped or another database)."""


@dataclass(frozen=True)
class BatchOutcome:
    """What one delivery of a batch did."""

    batch_id: int
    run_id: int
    applied: bool  # False: it was already done (or paused), nothing was written
    rows_changed: int = 0
    run_finished: bool = False  # this batch completed its run
    seconds: float = 0.0
    #: Why the delivery stopped before the batch's range was done ("paused",
    #: a throttle reason, "time budget"); None when the batch is done. The
    #: caller delivers it again later.
    yielded: str | None = None


@dataclass(frozen=True)
class _Chunk:
    """One transaction of a batch: what it found and did."""

    kind: str  # applied, done, paused, lock timeout
    run_id: int = 0
    changed: int = 0
    last: bool = False
    run_finished: bool = False
    waiters: str | None = None
    table: sa.Table | None = None
    rate_wait: float = 0.0


@dataclass(frozen=True)
class Merged:
    """PostgreSQL: what travels in the run row's locking read (see :func:`_advance_run`).

    ``read`` is :func:`.pieces.read_run` with the recount and the batch row's
    update as CTEs; ``params`` its parameters but the run's id.
    """

    read: Any
    params: dict[str, Any]
    ask: bool  # the read counts the sessions waiting on the transaction's locks
    started: float  # when the transaction started (time.monotonic)


#: Chunk kinds.
_APPLIED, _ALREADY, _PAUSED, _LOCKED = "applied", "done", "paused", "lock timeout"

#: Pause after a piece that application sessions waited on (seconds). They
#: go on at its commit, and the next piece locks other parents, so a pause
#: only stretches the backfill: under steady application traffic most pieces
#: see a waiter, and pauses of 0.2 s, then 0.05 s, made much of the
#: backfill's time (bench/impact.py, docs/performance.md). The piece's size
#: is still halved, and the run kept on the short target.
WAITERS_PAUSE = 0.0

#: Longest single back-off sleep (seconds).
MAX_SLEEP = 10.0


def _run_counters(counters: Mapping[str, Counter], run: Any, batch_id: int) -> list[Counter]:
    """The counters of the batch's run, as this process's models define them.

    Raises :class:`~.errors.DefinitionMismatch` when these models lack one of
    them or define it differently from the models that planned the run (an
    old worker during a rolling deploy): the batch is left for a worker
    running the same definitions.
    """
    keys = run.counter_keys.split(",")
    missing = [k for k in keys if k not in counters]
    if missing:
        raise DefinitionMismatch(
            f"batch {batch_id} recounts {', '.join(missing)}, which this worker's models do not "
            "declare; left for a worker running the current models (or run `enqueue` again "
            "to plan a new backfill if the counter was removed)"
        )
    chosen = [counters[k] for k in keys]
    seen = (tuple(chosen), run.fingerprints)
    if seen in _MATCHED:  # every piece of a run asks: fingerprinting costs ~0.3 ms
        return chosen
    planned = p.run_fingerprints({"fingerprints": run.fingerprints})
    differ = [
        c.key for c in chosen if c.key in planned and definition.fingerprint(c) != planned[c.key]
    ]
    if differ:
        raise DefinitionMismatch(
            f"batch {batch_id} was planned under another definition of {', '.join(differ)} "
            "than this worker's models; left for a worker running the models that planned it "
            "(deploy the same code to every worker)"
        )
    if len(_MATCHED) >= 256:
        _MATCHED.clear()
    _MATCHED.add(seen)
    return chosen


#: (counters, a run's recorded fingerprints) found to match (Counter objects are immutable).
_MATCHED: set[tuple[tuple[Counter, ...], str | None]] = set()


def run_batch(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_id: int,
    *,
    statement_timeout_ms: int | None = None,
    pacing: Pacing | None = None,
    throttle: Throttle | None = None,
    budget_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> BatchOutcome:
    """Apply batch ``batch_id`` once, in short transactions of an adaptive size.

    A batch is a planned key range; it is applied in one or more
    transactions, each cutting the next piece of the range (its size chosen by
    :mod:`.pacing` from the run's measured durations, unless ``--batch-size``
    pinned it) and following DESIGN.md section 3:

    1. lock the batch row (an ``UPDATE``, which also takes SQLite's write lock
       up front); if it is done already, stop; read where the range's cursor is;
    2. lock the piece's parents in key order (PostgreSQL), waiting at most the
       throttle's ``lock_timeout`` for writers that already applied a delta;
    3. recount every counter of the run in one ``UPDATE`` (a new statement,
       so a new snapshot), writing only rows whose value differs;
    4. move the cursor, or for the last piece mark the batch done; add its
       figures to the run; the batch that brings ``batches_done`` to
       ``batches_total`` marks the run and its counters active. The run row's
       update serialises concurrent batches, so exactly one of them sees the
       final count.

    Between transactions it backs off on database signals (see
    :mod:`.signals`) and stops early, returning ``yielded``, when the run is
    paused or ``budget_seconds`` ran out: the cursor is saved, so the next
    delivery continues where this one stopped.

    :param counters: declared counters by key.
    :param statement_timeout_ms: PostgreSQL ``statement_timeout`` for each
        transaction, so a batch stuck on a lock ends even inside a C call.
    :param pacing: target duration and bounds of the adaptive size.
    :param throttle: which database signals to obey.
    :param budget_seconds: longest time this delivery may take (None: no limit).
    """
    pacing = pacing or Pacing()
    throttle = throttle or Throttle()
    # One connection for the whole delivery: each transaction would
    # otherwise pay a pool check-out (and its ping) on top of its statements.
    with engine.connect() as conn:
        return _deliver(
            conn,
            counters,
            batch_id,
            pacing,
            throttle,
            statement_timeout_ms,
            budget_seconds,
            sleep,
        )


def _deliver(
    conn: Connection,
    counters: Mapping[str, Counter],
    batch_id: int,
    pacing: Pacing,
    throttle: Throttle,
    statement_timeout_ms: int | None,
    budget_seconds: float | None,
    sleep: Callable[[float], None],
) -> BatchOutcome:
    """:func:`run_batch`'s loop of transactions on one connection."""
    started = time.monotonic()
    changed, applied, first = 0, False, True
    locked_in_a_row = 0
    run_id = 0
    while True:
        chunk = _one_transaction(
            conn, counters, batch_id, pacing, throttle, statement_timeout_ms, first
        )
        # A piece that gave way rolled back its attempt count: the next one counts it.
        first = chunk.kind == _LOCKED and first
        run_id = chunk.run_id or run_id
        seconds = time.monotonic() - started
        if chunk.kind == _ALREADY:
            if not applied:
                log.info("batch %d already done; duplicate delivery ignored", batch_id)
            return BatchOutcome(batch_id, run_id, applied, changed, False, seconds)
        if chunk.kind == _PAUSED:
            log.info("batch %d paused; left for later", batch_id)
            return BatchOutcome(batch_id, run_id, applied, changed, False, seconds, "paused")
        if chunk.kind == _LOCKED:
            locked_in_a_row += 1
            wait = min(MAX_SLEEP, 0.25 * 2**locked_in_a_row)
            log.warning(
                "batch %d throttled: its parent rows stayed locked by other sessions for "
                "%d ms; backing off %.1fs with a smaller batch",
                batch_id,
                throttle.lock_timeout_ms,
                wait,
            )
            if _out_of_budget(started, budget_seconds, wait):
                return BatchOutcome(
                    batch_id, run_id, applied, changed, False, seconds, "throttled: lock wait"
                )
            sleep(wait)
            continue
        locked_in_a_row = 0
        applied = True
        changed += chunk.changed
        if chunk.last:
            return BatchOutcome(batch_id, run_id, True, changed, chunk.run_finished, seconds)
        wait = chunk.rate_wait
        if chunk.waiters:
            wait = max(wait, WAITERS_PAUSE)
        if chunk.table is not None and signals.health_check_due(time.monotonic()):
            reason = _health_pause(
                conn, chunk.table, throttle, batch_id, run_id, sleep, started, budget_seconds
            )
            if reason is not None:
                return BatchOutcome(
                    batch_id, run_id, True, changed, False, seconds, f"throttled: {reason}"
                )
        if _out_of_budget(started, budget_seconds, wait):
            return BatchOutcome(batch_id, run_id, True, changed, False, seconds, "time budget")
        if wait > 0:
            sleep(wait)


def _out_of_budget(started: float, budget: float | None, wait: float) -> bool:
    return budget is not None and time.monotonic() + wait - started >= budget


def _health_pause(
    conn: Connection,
    table: sa.Table,
    throttle: Throttle,
    batch_id: int,
    run_id: int,
    sleep: Callable[[float], None],
    started: float,
    budget: float | None,
) -> str | None:
    """Sleep while autovacuum or replica lag says so; return the reason if the budget ran out."""
    pause = 1.0
    while True:
        # The delivery's own connection, between two of its transactions.
        reason = signals.health(conn, table, throttle)
        if reason is None:
            conn.rollback()
            return None
        _record_throttle(conn, run_id, reason)
        conn.commit()
        log.warning("batch %d throttled: %s; pausing %.1fs", batch_id, reason, pause)
        if _out_of_budget(started, budget, pause):
            return reason
        sleep(pause)
        pause = min(MAX_SLEEP, pause * 2)


def _record_throttle(conn: Connection, run_id: int, reason: str) -> None:
    r = p.runs_table
    conn.execute(
        sa.update(r).where(r.c.id == run_id).values(throttle_reason=reason, throttled_at=p.now())
    )


def _session_settings(
    conn: Connection, statement_timeout_ms: int | None, throttle: Throttle
) -> dict[str, str]:
    """Apply the transaction's settings; on PostgreSQL return them for :func:`_lock_batch`."""
    if innodb.is_innodb(conn.dialect):
        # A fresh snapshot per statement: the recount sees what it waited for
        # (docs/databases.md); and a lock wait bounded like a statement.
        innodb.read_committed_transaction(conn)
        if statement_timeout_ms:
            innodb.bound_lock_waits(conn, statement_timeout_ms)
        return {}
    if conn.dialect.name != "postgresql":
        return {}
    # A batch is a short statement: JIT compilation (triggered by the
    # planner's cost estimate of the recount) costs more than it saves.
    settings = {"jit": "off"}
    # No wait for the WAL flush at commit: a batch lost to a server crash is
    # lost whole (recount, cursor and figures are one transaction) and runs
    # again; any later synchronous commit flushes it, e.g. an application
    # write that waited on its locks.
    settings["synchronous_commit"] = "off"
    if statement_timeout_ms:
        settings["statement_timeout"] = str(statement_timeout_ms)
    if throttle.lock_timeout_ms:
        settings["lock_timeout"] = str(throttle.lock_timeout_ms)
    return settings


def _lock_batch(
    conn: Connection, batch_id: int, first: bool, settings: dict[str, str] | None = None
) -> Any:
    """Lock the batch row and read it with its run's settings (None: no such batch).

    One round trip on PostgreSQL (``UPDATE … FROM`` reads the run row without
    locking it), which also applies the transaction's ``settings`` (the
    ``RETURNING`` list calls ``set_config``, so they bind every later
    statement of the transaction: the parents' lock wait, the recount);
    SQLite cannot return another table's columns, so it reads the run in a
    second statement.
    """
    b, r = p.batches_table, p.runs_table
    settings = settings or {}
    params: dict[str, Any] = {"batch_id": batch_id, "bump": 1 if first else 0, "started": p.now()}
    dialect = conn.dialect.name
    if dialect == "postgresql":
        params.update({f"setting_{i}": v for i, v in enumerate(settings.values())})
        stmt = pieces.lock_batch(dialect, list(settings), returning=True)
        return conn.execute(stmt, params).first()
    returning = conn.dialect.update_returning
    result = conn.execute(pieces.lock_batch(dialect, [], returning=returning), params)
    if returning:
        row = result.first()
    elif result.rowcount == 0:
        row = None
    else:  # the UPDATE locked the row: nobody changed it in between
        mine = (b.c.state, b.c.run_id, b.c.lo, b.c.hi, b.c.cursor)
        row = conn.execute(sa.select(*mine).where(b.c.id == batch_id)).first()
    if row is None:
        return None
    run = conn.execute(
        sa.select(*[r.c[name] for name in pieces.RUN_SETTINGS], r.c.state.label("run_state")).where(
            r.c.id == row.run_id
        )
    ).one()
    return SimpleNamespace(**row._asdict(), **run._asdict())


def _one_transaction(
    conn: Connection,
    counters: Mapping[str, Counter],
    batch_id: int,
    pacing: Pacing,
    throttle: Throttle,
    statement_timeout_ms: int | None,
    first: bool,
) -> _Chunk:
    """Apply the next piece of the batch's range in one transaction (steps 1-4 above)."""
    t0 = time.monotonic()
    row: Any = None
    settings = _session_settings(conn, statement_timeout_ms, throttle)
    try:
        row = _lock_batch(conn, batch_id, first, settings)
        if row is None:
            raise BatchNotFound(f"batch {batch_id} is not recorded in counterfill_batches")
        if row.state == p.BATCH_DONE:
            conn.rollback()
            return _Chunk(_ALREADY, row.run_id)
        run = row
        if run.run_state in (p.RUN_CANCELLED, p.RUN_SUPERSEDED):
            conn.rollback()
            log.info("batch %d: run %d was %s; skipped", batch_id, row.run_id, run.run_state)
            return _Chunk(_ALREADY, row.run_id)
        if run.paused_at is not None:
            conn.rollback()
            return _Chunk(_PAUSED, row.run_id)
        chosen = _run_counters(counters, run, batch_id)
        table, pk = chosen[0].parent_table, chosen[0].parent_pk
        lo, hi = decode_key(pk, row.lo), decode_key(pk, row.hi)
        start = decode_key(pk, row.cursor) if row.cursor is not None else lo
        size = run.chunk_size or run.batch_size
        end, last = hi, True
        mysql = innodb.is_innodb(conn.dialect)
        postgresql = conn.dialect.name == "postgresql"
        if size < run.batch_size and not postgresql:
            cut = next_boundary(conn, pk, start, size)
            if cut is not None and (hi is None or cut < hi):
                end, last = cut, False
        if mysql:
            parents = innodb.lock_parents(conn, table, pk, start, end)
        elif postgresql and size < run.batch_size:
            # Cut and lock the piece in one statement (see lock_next_parents).
            found = conn.execute(*pieces.lock_next_parents(table, pk, start, hi, size)).first()
            parents = found.n if found is not None else 0
            if found is not None and parents > size:
                end, last, parents = found.k, False, size
        elif conn.dialect.name != "sqlite":  # SQLite has one writer at a time already
            parents = conn.execute(*pieces.lock_parents(table, pk, start, end)).scalar_one()
        else:
            parents = conn.execute(_count_parents(table, pk, start, end)).scalar_one()
        n: Any = 0
        if mysql:  # stage the truths (no child locks), then write what differs
            # Buffered counters' deltas (the transaction is READ COMMITTED).
            innodb_deltas.discard_locked(conn, chosen, start, end, read_committed=True)
            n = innodb_recount.recount_range(conn, chosen, start, end, parents=parents)
        elif not postgresql:  # PostgreSQL: below, in the run row's read
            stmts, bounds = pieces.recount(chosen, start, end, conn.dialect.name)
            for stmt in stmts:
                n = conn.execute(stmt, bounds).rowcount
        seconds = time.monotonic() - t0
        moving: dict[str, Any] = {"batch_id": batch_id}
        if last:
            moving["now"] = p.now()
        else:
            moving["new_cursor"] = encode_key(end)
        waiters: str | None = None
        if postgresql:
            # The recount, the waiters' count and the batch row's update
            # travel with the run row's read (_advance_run): three round trips
            # fewer while the parents are locked, which application writes may
            # be waiting for. The recount is a data-modifying CTE: still a
            # statement of its own after the lock statement (a new snapshot).
            # Buffered counters: it also removes the range's pending deltas
            # (recount_statements gives one statement). Built once per shape
            # (.pieces): only the bounds, the batch and its cursor change.
            read = pieces.read_run(
                chosen,
                open_lo=start is None,
                open_hi=end is None,
                last=last,
                ask=throttle.lock_waiters,
            )
            moving.update(pieces.bounds(pk, start, end)[2])
            merged: Merged | None = Merged(read, moving, throttle.lock_waiters, t0)
        else:
            waiters = signals.lock_waiters(conn) if throttle.lock_waiters else None
            conn.execute(pieces.move_batch(last), {**moving, "n": n})
            merged = None
        finished, rate_wait, next_size, waiters, aim, n, seconds = _advance_run(
            conn,
            row.run_id,
            pacing,
            size=size,
            parents=parents,
            seconds=seconds,
            changed=n,
            last=last,
            was_failed=row.state == p.BATCH_FAILED,
            waiters=waiters,
            counters=chosen,
            merged=merged,
        )
        conn.commit()
    except sa.exc.DBAPIError as exc:
        if not signals.is_lock_timeout(exc):
            raise
        conn.rollback()
        run_id = row.run_id if row is not None else 0  # None: a duplicate holds the batch
        if run_id:
            _shrink(conn, run_id, pacing, "parent rows locked by other sessions (lock_timeout)")
            conn.commit()
        return _Chunk(_LOCKED, run_id)
    log.info(
        "batch %d %s [%s, %s) parents=%d rows_changed=%d in %.3fs%s%s%s%s",
        batch_id,
        run.counter_keys,
        key_text(start),
        key_text(end, upper=True),
        parents,
        n,
        seconds,
        "" if run.pinned or last else f"; next size {next_size}{aim}",
        f"; throttled: {waiters}" if waiters else "",
        "; batch done" if last else "",
        "; run complete" if finished else "",
    )
    return _Chunk(_APPLIED, row.run_id, n, last, finished, waiters, table, rate_wait)


def _count_parents(table: sa.Table, pk: sa.Column[Any], lo: Any, hi: Any) -> sa.Select[Any]:
    """Parents in ``[lo, hi)`` (SQLite, where no lock statement counts them)."""
    stmt = sa.select(sa.func.count()).select_from(table)
    if lo is not None:
        stmt = stmt.where(pk >= lo)
    if hi is not None:
        stmt = stmt.where(pk < hi)
    return stmt


def _advance_run(
    conn: Connection,
    run_id: int,
    pacing: Pacing,
    *,
    size: int,
    parents: int,
    seconds: float,
    changed: int,
    last: bool,
    was_failed: bool,
    waiters: str | None,
    counters: list[Counter],
    merged: Merged | None = None,
) -> tuple[bool, float, int, str | None, str, int, float]:
    """Add one transaction's figures to the run; complete it if this was its last batch.

    Returns (run finished, seconds to wait under the rate limit, next size,
    lock waiters, the target the next size aims at as the log line shows it,
    rows the recount changed, the transaction's seconds so far).
    With ``merged`` (PostgreSQL), the recount and the batch row's update (CTEs)
    and the waiters' count (a scalar subquery, or None) run in the statement
    that locks and reads the run row; ``changed`` and ``seconds`` are then
    what that statement returned and took.
    The run row is locked here, at the end of the transaction, as the
    ``UPDATE`` of the figures would lock it anyway.
    """
    r, c = p.runs_table, p.counters_table
    if merged is not None:
        run = conn.execute(merged.read, {**merged.params, "the_run": run_id}).mappings().one()
        changed = int(run["counterfill_changed"])
        seconds = time.monotonic() - merged.started
        if merged.ask:
            waiters = signals.waiters_reason(run["counterfill_waiters"])
    else:
        run = conn.execute(pieces.read_run(), {"the_run": run_id}).mappings().one()
    now = p.now()
    # Set to these; rows_changed, parents_done and the batch counts are added to.
    values: dict[str, Any] = {"last_batch_at": now}
    next_size, aim = size, ""
    if not run["pinned"] and run["chunk_size"]:  # runs planned before 0.2 have none
        bounds = _bounds(pacing, run["batch_size"])
        # Contended: sessions waited on this piece, or the run was throttled
        # lately (waiters, a lock it could not get, autovacuum, replica lag).
        lately = run["throttled_at"]
        contended = waiters is not None or (
            lately is not None and (now - _aware(lately)).total_seconds() < CONTENDED_SECONDS
        )
        step = next_size_after(
            bounds,
            size,
            parents,
            seconds,
            History.loads(run["pacing_history"]),
            back_off=waiters is not None,
            contended=contended,
        )
        # The last piece of a range is often short: it informs the estimate
        # but does not by itself shrink the size.
        next_size = step.size if not last or waiters else max(step.size, run["chunk_size"])
        values["chunk_size"] = next_size
        # Which of the two targets the size aims at, for the batch's log line.
        aim = f" ({'contended' if contended else 'idle'} target {bounds.target(contended):g}s)"
        values["seconds_per_parent"] = step.seconds_per_parent
        values["pacing_history"] = step.history.dumps()
    if waiters:
        values["throttle_reason"] = waiters
        values["throttled_at"] = now
    values.update(_window(run, now, parents))
    rate_wait = 0.0
    limit = run["max_rows_per_second"]
    if limit and parents:
        # A shared timeline on the run row: each piece books parents/limit
        # seconds of it, and its worker waits until its booking ends.
        slot = max(_aware(run["rate_next_at"]) if run["rate_next_at"] else now, now)
        booked = slot + dt.timedelta(seconds=parents / limit)
        values["rate_next_at"] = booked
        rate_wait = (booked - now).total_seconds()
    returning = conn.dialect.update_returning
    update = pieces.update_run(
        sorted(values), last=last, was_failed=was_failed, returning=returning
    )
    params = {f"v_{k}": v for k, v in values.items()}
    params.update({"the_run": run_id, "d_changed": changed, "d_parents": parents})
    result = conn.execute(update, params)
    if not returning:  # the UPDATE locked the row: nobody changed it in between
        result = conn.execute(pieces.run_counts(), {"the_run": run_id})
    done, failed, total = result.one()
    if not last:
        return False, rate_wait, next_size, waiters, aim, changed, seconds
    if done >= total:
        conn.execute(sa.update(r).where(r.c.id == run_id).values(state=p.RUN_DONE, finished_at=now))
        # Completing records each counter's definition (the one the run was
        # planned under, which these models share) as what its column follows.
        for counter in counters:
            parts = definition.definition(counter)
            conn.execute(
                sa.update(c)
                .where(c.c.run_id == run_id, c.c.key == counter.key)
                .values(
                    state=p.ACTIVE,
                    updated_at=now,
                    activated_at=sa.func.coalesce(c.c.activated_at, now),
                    fingerprint=definition.fingerprint_of(parts),
                    definition=definition.encode(parts),
                )
            )
        notify.announce(conn, run_id)  # sent at this commit: `--wait` stops waiting
        return True, rate_wait, next_size, waiters, aim, changed, seconds
    if done + failed >= total:
        _fail_run(conn, run_id, now)
    return False, rate_wait, next_size, waiters, aim, changed, seconds


def _bounds(pacing: Pacing, batch_size: int) -> Pacing:
    """The controller's bounds for a run whose planned ranges hold ``batch_size`` parents."""
    return replace(pacing, max_size=batch_size, min_size=min(pacing.min_size, batch_size))


def _window(run: Any, now: dt.datetime, parents: int) -> dict[str, Any]:
    """Recent-window rate: parents since the window opened; a window closes after
    ``RATE_WINDOW_SECONDS`` and its rate is kept for ``status``."""
    start = run["window_started_at"]
    if start is None:
        return {"window_started_at": now, "window_parents": parents}
    elapsed = (now - _aware(start)).total_seconds()
    total = (run["window_parents"] or 0) + parents
    if elapsed >= p.RATE_WINDOW_SECONDS:
        return {"window_rate": total / elapsed, "window_started_at": now, "window_parents": 0}
    return {"window_parents": total}


def _shrink(conn: Connection, run_id: int, pacing: Pacing, reason: str) -> None:
    """Halve the run's adaptive size and record why (a piece could not get its locks)."""
    r = p.runs_table
    run = conn.execute(
        sa.select(r.c.chunk_size, r.c.pinned, r.c.batch_size).where(r.c.id == run_id)
    ).one()
    values: dict[str, Any] = {"throttle_reason": reason, "throttled_at": p.now()}
    if run.chunk_size and not run.pinned:
        values["chunk_size"] = _bounds(pacing, run.batch_size).clamp(
            run.chunk_size * BACKOFF_SHRINK
        )
    conn.execute(sa.update(r).where(r.c.id == run_id).values(values))


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _fail_run(conn: Connection, run_id: int, now: Any) -> None:
    """Every batch has finished and some failed: the run and its counters are ``failed``."""
    r, c = p.runs_table, p.counters_table
    conn.execute(sa.update(r).where(r.c.id == run_id).values(state=p.RUN_FAILED, finished_at=now))
    conn.execute(
        sa.update(c)
        .where(c.c.run_id == run_id, c.c.state == p.BACKFILLING)
        .values(state=p.FAILED, updated_at=now)
    )
    notify.announce(conn, run_id)


def mark_refused(engine: sa.Engine, batch_id: int, error: str) -> int:
    """Record that a worker refused ``batch_id`` (another definition); return the refusal count.

    The batch stays to be run: it is neither done nor failed, and ``status``
    shows it waiting for a worker running the matching models.
    """
    b = p.batches_table
    with engine.begin() as conn:
        row = innodb.update_returning(
            conn,
            sa.update(b)
            .where(b.c.id == batch_id, b.c.state != p.BATCH_DONE)
            .values(refusals=b.c.refusals + 1, error=error),
            b.c.id == batch_id,
            b.c.refusals,
        )
    log.warning("batch %d refused: %s", batch_id, error)
    return int(row.refusals) if row is not None else 0


def describe(exc: BaseException) -> str:
    """A one-line description of an error for the batch row and the logs.

    Database errors are described by the driver's error (its first line), not
    SQLAlchemy's wrapper, which would repeat the whole statement.
    """
    orig = getattr(exc, "orig", None) if isinstance(exc, sa.exc.DBAPIError) else None
    cause = orig if isinstance(orig, BaseException) else exc
    args: tuple[Any, ...] = tuple(getattr(cause, "args", ()))
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        cause_text = f"{args[1]} (error {args[0]})"  # MySQL drivers: (code, message)
    else:
        cause_text = str(cause)
    lines = cause_text.strip().splitlines()
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
        row = innodb.update_returning(
            conn,
            sa.update(b).where(b.c.id == batch_id).values(error=error),
            b.c.id == batch_id,
            b.c.state,
            b.c.run_id,
        )
        if row is None or row.state == p.BATCH_DONE:
            conn.rollback()
            return False
        newly = row.state != p.BATCH_FAILED
        if newly:
            conn.execute(
                sa.update(b).where(b.c.id == batch_id).values(state=p.BATCH_FAILED, finished_at=now)
            )
            done, failed, total = innodb.update_returning(
                conn,
                sa.update(r)
                .where(r.c.id == row.run_id)
                .values(batches_failed=r.c.batches_failed + 1),
                r.c.id == row.run_id,
                r.c.batches_done,
                r.c.batches_failed,
                r.c.batches_total,
            )
            if done + failed >= total:
                _fail_run(conn, row.run_id, now)
        conn.commit()
    log.error("batch %d failed: %s", batch_id, error)
    return newly


def note_retry(engine: sa.Engine, batch_id: int, error: str) -> None:
    """Record the error of an attempt that will be retried (``--wait`` and ``status`` show it)."""
    b = p.batches_table
    with engine.begin() as conn:
        conn.execute(
            sa.update(b).where(b.c.id == batch_id, b.c.state != p.BATCH_DONE).values(error=error)
        )
