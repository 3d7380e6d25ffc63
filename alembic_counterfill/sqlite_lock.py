"""SQLite: take the database's write lock before reading old state, so several writers stay exact.

pysqlite (and aiosqlite over it) begins a transaction only at the first
INSERT/UPDATE/DELETE, so a SELECT of a child row's old state before that runs
outside any transaction: another writer may move the row between our read
and our write, and the delta would be computed from a stale old state.
``BEGIN IMMEDIATE`` takes SQLite's RESERVED lock first; other writers then
wait (up to the busy timeout) until we commit, and our read is the committed
state. Readers are not blocked (in WAL mode not even during the commit).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def begin_write(connection: sa.Connection) -> None:
    """On SQLite, start the transaction with ``BEGIN IMMEDIATE`` unless one is already open.

    A transaction already open has written (pysqlite opens one only for a
    write), so it holds the write lock already. Connections in autocommit
    mode are left alone: each statement is its own transaction there.
    """
    if connection.dialect.name != "sqlite":
        return
    driver: Any = connection.connection.driver_connection
    if driver is None or getattr(driver, "in_transaction", True):
        return
    if getattr(driver, "isolation_level", "") is None:  # AUTOCOMMIT: no transactions
        return
    connection.exec_driver_sql("BEGIN IMMEDIATE")
