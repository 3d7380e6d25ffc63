"""Worker heartbeats in the bookkeeping tables: ``status`` tells running from stalled by them."""

from __future__ import annotations

import logging
import os
import socket
import threading

import sqlalchemy as sa

from . import progress as p

log = logging.getLogger("alembic_counterfill.heartbeat")

#: Seconds between two heartbeats of one worker process.
INTERVAL = 10.0


def worker_id() -> str:
    """This process's id in ``counterfill_workers``: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(engine: sa.Engine, ident: str, queue: str | None) -> None:
    """Record that worker ``ident`` is alive now (insert or refresh its row)."""
    w = p.workers_table
    now = p.now()
    with engine.begin() as conn:
        updated = conn.execute(
            sa.update(w).where(w.c.id == ident).values(seen_at=now, queue=queue)
        ).rowcount
        if not updated:
            conn.execute(sa.insert(w).values(id=ident, queue=queue, started_at=now, seen_at=now))


def forget(engine: sa.Engine, ident: str) -> None:
    """Remove worker ``ident``'s row (clean shutdown)."""
    w = p.workers_table
    with engine.begin() as conn:
        conn.execute(sa.delete(w).where(w.c.id == ident))


class Heartbeat:
    """A daemon thread beating every :data:`INTERVAL` seconds until :meth:`stop`."""

    def __init__(self, engine: sa.Engine, queue: str | None, interval: float = INTERVAL) -> None:
        self.engine = engine
        self.queue = queue
        self.interval = interval
        self.ident = worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        """Create the bookkeeping tables if needed, beat once, then keep beating in a thread."""
        try:
            with self.engine.begin() as conn:
                p.ensure_tables(conn)
        except Exception as exc:  # e.g. another worker adding the same column right now
            log.info("bookkeeping tables not updated by this worker: %s", exc)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="counterfill-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            beat(self.engine, self.ident, self.queue)
        except Exception as exc:  # a missed beat only makes `status` cautious
            log.warning("heartbeat failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        """Stop beating and remove this worker's row."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            forget(self.engine, self.ident)
        except Exception as exc:  # the row then simply ages out
            log.warning("could not remove heartbeat row: %s", exc)
