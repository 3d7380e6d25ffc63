"""Deterministic races: hold a row lock from a third connection, start the racers, release.

PostgreSQL and MariaDB.

Every helper here ends what it started: lock holders roll back and close in
``finally``; racers run in daemon threads joined with a timeout, so a test that
fails (or a library that deadlocks) fails the test instead of hanging the
session.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

#: Longest wait for a racer to finish or to block; generous, it is a hang guard.
JOIN_TIMEOUT = 60.0


class Racer:
    """Run ``fn()`` in a daemon thread; :meth:`join` returns its result or raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str = "racer") -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc
        finally:
            self.done.set()

    def start(self) -> Racer:
        self.thread.start()
        return self

    def join(self, timeout: float = JOIN_TIMEOUT) -> Any:
        """The racer's result; AssertionError when it is still blocked after ``timeout``."""
        if not self.done.wait(timeout):
            raise AssertionError(
                f"{self.thread.name} still blocked after {timeout:.0f}s (deadlock?)"
            )
        if self.error is not None:
            raise self.error
        return self.result


def settle(racers: Iterable[Racer]) -> None:
    """Wait, bounded, for every racer to end: a failed test must not close a session in use."""
    for racer in racers:
        racer.done.wait(JOIN_TIMEOUT)


@contextmanager
def holding(engine: sa.Engine, sql: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Run a locking ``sql`` on a connection of its own; roll back and close it on the way out."""
    conn = engine.connect()
    try:
        conn.execute(sa.text(sql), params or {})
        yield conn
    finally:
        conn.rollback()
        conn.close()


def race_engine(url: str, **kw: Any) -> sa.Engine:
    """An engine whose lock waits :func:`lock_waiters` can tell from other test runs'.

    PostgreSQL: connections carry an ``application_name`` of their own.
    MariaDB: each test has a database of its own (``database()``).
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.update_query_dict({"application_name": f"race-{uuid.uuid4().hex[:10]}"})
    return sa.create_engine(parsed, pool_size=10, **kw)


def lock_waiters(engine: sa.Engine) -> int:
    """How many of this engine's sessions wait for a lock right now."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND application_name = :app"
                ),
                {"app": engine.url.query["application_name"]},
            ).scalar_one()
        return len(innodb_waiters(conn))


#: One transaction of SHOW ENGINE INNODB STATUS: its session, and the table of the lock it awaits.
_TRX_THREAD = re.compile(r"thread id (\d+)")
_AWAITED_TABLE = re.compile(r"FOR THIS LOCK TO BE GRANTED:\s*\n.*? table `([^`]+)`\.`", re.S)


def innodb_waiters(conn: sa.Connection) -> list[int]:
    """Session ids waiting for a lock on a table of ``conn``'s database (MariaDB/MySQL).

    Read from ``SHOW ENGINE INNODB STATUS``, which InnoDB prints live.
    ``information_schema.INNODB_TRX`` is a cache that the server refreshes
    only after 0.1 s without readers: with a few tests polling it (these
    helpers poll every 20-50 ms), it kept a picture that was a minute old,
    showing a blocked batch as RUNNING and a lock holder not at all.
    """
    database = conn.execute(sa.text("SELECT database()")).scalar_one()
    status = conn.exec_driver_sql("SHOW ENGINE INNODB STATUS").one()[2]
    found = []
    for block in status.split("---TRANSACTION ")[1:]:
        thread, table = _TRX_THREAD.search(block), _AWAITED_TABLE.search(block)
        if "LOCK WAIT" in block and thread and table and table.group(1) == database:
            found.append(int(thread.group(1)))
    return sorted(found)


def row_lock(engine: sa.Engine) -> str:
    """The clause a lock holder uses: a parent row lock that still lets FK checks through."""
    return "FOR NO KEY UPDATE" if engine.dialect.name == "postgresql" else "FOR UPDATE"


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = JOIN_TIMEOUT) -> Any:
    """Poll ``predicate`` until truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_blocked(engine: sa.Engine, n: int, *racers: Racer) -> None:
    """Wait until ``n`` backends wait for locks; fail early if a racer ended instead."""

    def check() -> bool:
        for r in racers:
            if r.done.is_set():
                r.join(0)  # raises its error, if any
                raise AssertionError(f"{r.thread.name} finished instead of waiting for a lock")
        return lock_waiters(engine) >= n

    wait_until(check, f"{n} backend(s) to wait for a lock")
