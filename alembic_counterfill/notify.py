"""Completion notification: the batch that ends a run says so, and ``--wait`` listens.

On PostgreSQL the transaction that marks a run done or failed also sends
``NOTIFY`` on :data:`CHANNEL` (delivered at its commit, never before), so
``enqueue --wait`` wakes up as soon as the run ends instead of at its next
poll. Elsewhere (SQLite, MariaDB/MySQL, a driver without notifications)
:class:`Listener` waits by sleeping and the wait loop keeps polling: the
bookkeeping rows stay the one source of truth either way, a notification
only cuts the wait short.
"""

from __future__ import annotations

import select
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: The channel runs' ends are announced on (payload: the run id).
CHANNEL = "counterfill_run_ended"


def announce(conn: Connection, run_id: int) -> None:
    """Queue the notification that ``run_id`` ended; PostgreSQL sends it when ``conn`` commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_notify(CHANNEL, str(run_id))))


class Listener:
    """Waits up to a timeout, returning early when a run-ended notification arrives.

    Use as a context manager; :attr:`received` lists the payloads (run ids)
    received so far, and :attr:`listening` whether notifications are used at
    all (False: plain sleeps).
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.received: list[str] = []
        self.listening = False
        self._conn: Connection | None = None
        self._driver: Any = None

    def __enter__(self) -> Listener:
        if self.engine.dialect.name != "postgresql" or self.engine.dialect.driver not in (
            "psycopg",
            "psycopg2",
        ):
            return self
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            # A fixed statement: LISTEN takes no parameter, and the channel is ours.
            conn.exec_driver_sql(f"LISTEN {CHANNEL}")
        except sa.exc.DBAPIError:
            conn.close()  # e.g. a pooler in transaction mode: fall back to polling
            return self
        self._conn, self._driver = conn, conn.connection.driver_connection
        self.listening = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql("UNLISTEN *")
            except sa.exc.DBAPIError:
                self._conn.invalidate()  # broken: never back into the pool listening
            finally:
                self._conn.close()
                self._conn = None
                self.listening = False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True when a notification cut the wait short."""
        if not self.listening:
            time.sleep(timeout)
            return False
        before = len(self.received)
        if self.engine.dialect.driver == "psycopg":
            for note in self._driver.notifies(timeout=timeout, stop_after=1):
                self.received.append(note.payload)
        else:  # psycopg2: wait for the socket, then collect
            if select.select([self._driver], [], [], timeout)[0]:
                self._driver.poll()
                while self._driver.notifies:
                    self.received.append(self._driver.notifies.pop(0).payload)
        return len(self.received) > before
