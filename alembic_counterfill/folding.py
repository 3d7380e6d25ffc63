"""When folds run: inline in the writing process (embedded mode), or on workers (Dramatiq).

Embedded mode (the default, like backfills without a broker): after a
transaction that appended deltas commits, the writing process schedules one
fold of that parent table within :data:`INTERVAL` seconds on a timer thread
(at most one pending per engine and table), so the plain attribute lags by
at most about the interval. An ``AsyncSession`` app's fold runs as a task of
its event loop instead (a fold still pending when the loop closes is left to
the next commit, a worker or ``alembic counterfill fold``). Apps whose workers fold instead
(``dramatiq alembic_counterfill.worker``) may turn inline folding off with
:func:`configure_folding`; both at once are still exact, only busier.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .fold import fold_on, fold_table

log = logging.getLogger("alembic_counterfill.folding")

#: Seconds between a commit that appended deltas and the inline fold.
INTERVAL = 0.25

_INFO = "counterfill.appended"
_settings = {"inline": True, "interval": INTERVAL}
_scheduled: set[tuple[sa.Engine, sa.Table]] = set()
_lock = threading.Lock()


def configure_folding(*, inline: bool = True, interval: float = INTERVAL) -> None:
    """Choose whether this process folds its own deltas after commit, and how soon.

    :param inline: fold on a timer thread of the writing process (embedded
        mode); turn off when workers fold (they run ``counterfill_fold``).
    :param interval: seconds from a commit to its fold; the plain counter
        attribute lags by about this much (``counter_value()`` never lags).
    """
    if interval <= 0:
        raise ValueError("configure_folding(interval=...) must be a positive number of seconds")
    _settings["inline"] = inline
    _settings["interval"] = interval


def appended(session: Session, parent: sa.Table) -> None:
    """Note that ``session``'s transaction appended deltas for ``parent`` (fold after commit)."""
    bind = session.get_bind(clause=parent)
    engine = bind if isinstance(bind, sa.Engine) else bind.engine
    session.info.setdefault(_INFO, set()).add((engine, parent))


def forget(session: Session, *args: Any) -> None:
    """``after_soft_rollback``: the appended deltas are gone with the transaction."""
    session.info.pop(_INFO, None)


def after_commit(session: Session) -> None:
    """``after_commit``: schedule a fold of each parent table the transaction appended to."""
    touched = session.info.pop(_INFO, None)
    if not touched or not _settings["inline"]:
        return
    for engine, parent in touched:
        schedule(engine, parent, float(_settings["interval"]))


#: Tries of one scheduled fold before waiting for the next commit.
ATTEMPTS = 3


def schedule(engine: sa.Engine, parent: sa.Table, delay: float, attempt: int = 1) -> None:
    """Fold ``parent``'s pending deltas in ``delay`` seconds (once per engine and table).

    On a timer thread; for an async engine (``AsyncSession``), as a task of
    the committing event loop, on the app's own pool: a thread cannot use
    connections that belong to another event loop.
    """
    key = (engine, parent)
    loop = _running_loop() if engine.dialect.is_async else None
    if engine.dialect.is_async and loop is None:
        return  # committed outside any event loop: a worker or the next commit folds
    if key in _scheduled:
        return  # the usual case under load; checked again under the lock below
    with _lock:
        if key in _scheduled:
            return
        _scheduled.add(key)
    if loop is not None:
        loop.call_later(delay, _start_task, loop, engine, parent, attempt)
        return
    timer = threading.Timer(delay, _run, (engine, parent, attempt))
    timer.daemon = True
    timer.start()


def _failed(engine: sa.Engine, parent: sa.Table, attempt: int, exc: BaseException) -> None:
    # Retried; after that the next commit (or a worker, or `fold`) folds.
    log.warning("inline fold of %s failed (attempt %d): %s", parent.name, attempt, exc)
    if attempt < ATTEMPTS:
        schedule(engine, parent, float(_settings["interval"]) * 2**attempt, attempt + 1)


def _run(engine: sa.Engine, parent: sa.Table, attempt: int) -> None:
    # Unschedule first: a commit landing during the fold schedules the next one.
    with _lock:
        _scheduled.discard((engine, parent))
    try:
        fold_table(engine, parent)
    except Exception as exc:
        _failed(engine, parent, attempt, exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# Tasks in flight: the loop keeps only weak references to them.
_tasks: set[asyncio.Task[None]] = set()


def _start_task(
    loop: asyncio.AbstractEventLoop, engine: sa.Engine, parent: sa.Table, attempt: int
) -> None:
    task = loop.create_task(_run_async(engine, parent, attempt))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _run_async(engine: sa.Engine, parent: sa.Table, attempt: int) -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine  # only apps with async drivers get here

    with _lock:
        _scheduled.discard((engine, parent))
    try:
        async with AsyncEngine(engine).connect() as conn:
            await conn.run_sync(lambda sync: fold_on(sync, parent))
    except Exception as exc:
        _failed(engine, parent, attempt, exc)
