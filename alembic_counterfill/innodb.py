"""InnoDB (MariaDB, MySQL) forms of the statements whose PostgreSQL forms InnoDB lacks.

Three InnoDB facts shape them (DESIGN.md section 3, "MariaDB/MySQL"):

- an INSERT or FK move of a child takes a *shared* lock on the parent row for
  the foreign-key check, and InnoDB has no ``FOR NO KEY UPDATE``: two writers
  that each take the shared lock and then want the exclusive one to apply a
  delta deadlock. So writers lock their parents exclusively, in key order,
  *before* the child writes (:func:`lock_parent_keys`);
- there is no ``UPDATE … RETURNING`` (MariaDB has ``DELETE … RETURNING``, MySQL
  neither): :func:`update_returning` updates, then reads the row it now holds;
- ``REPEATABLE READ`` is the default, and its snapshot is taken at a
  transaction's first read, before any lock wait. Backfill batches and
  verify run ``READ COMMITTED`` (:data:`ISOLATION`), so the recount after the
  parent lock reads what the writers it waited for committed, and no gap
  locks are taken. ``GET_LOCK`` replaces PostgreSQL's advisory locks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect

from .errors import CounterfillError
from .innodb_access import BY_PRIMARY_KEY, ValuesFirst

#: Isolation level of the library's own batch and verify transactions.
ISOLATION = "READ COMMITTED"

#: Parents per locking read (one bound parameter each).
CHUNK = 1000

#: Parents per ``SET c = CASE pk WHEN …`` statement: the server tests a CASE's
#: branches one by one for every row, so the cost grows with the square of
#: the chunk; a few hundred keeps it negligible next to the round trip.
CASE_CHUNK = 250

_HELD = "counterfill.named_locks"
_LOCK_WAIT = "counterfill.lock_wait_timeout"
_LOCKED = "counterfill.locked_parents"


#: SQLAlchemy's names of the MariaDB/MySQL dialects.
DIALECTS = ("mysql", "mariadb")


def is_innodb(dialect: Dialect) -> bool:
    """Whether ``dialect`` talks to MariaDB or MySQL."""
    return dialect.name in DIALECTS


def key_match(
    columns: Sequence[Any], keys: Iterable[Sequence[Any]], *, expanding: bool = True
) -> Any:
    """``pk IN (...)``; for a composite key, ``(a = 1 AND b = 2) OR ...``.

    MariaDB answers a row-constructor ``(a, b) IN (...)`` with a full scan,
    which under a lock would lock every row; the OR of equalities is a set of
    primary-key ranges. ``expanding=False`` (a statement run with many
    parameter sets) uses the OR form for single-column keys too.
    """
    keys = list(keys)
    if len(columns) == 1 and expanding:
        return columns[0].in_([k[0] for k in keys])
    if not keys:
        return sa.false()
    return sa.or_(*[sa.and_(*[c == v for c, v in zip(columns, k, strict=True)]) for k in keys])


def lock_parent_keys_shared(
    connection: Connection, table: sa.Table, pk: sa.Column[Any], keys: Iterable[Any]
) -> None:
    """Take shared locks on the parents ``keys`` in key order (writers of buffered counters).

    A buffered counter's writer never updates its parent: the only parent
    locks it takes are the shared ones of the foreign-key checks of its child
    and delta rows. Taking them up front, in key order, keeps them in the
    order a fold takes its exclusive locks, so a writer and a fold wait for
    each other but never deadlock. Writers still share them with each other.
    """
    ordered = sorted({k for k in keys if k is not None})
    for start in range(0, len(ordered), CHUNK):
        part = ordered[start : start + CHUNK]
        stmt = (
            sa.select(pk)
            .with_hint(table, BY_PRIMARY_KEY)
            .where(pk.in_(part))
            .order_by(pk)
            .with_for_update(read=True)
        )
        connection.execute(stmt).all()


def lock_parents_by_mode(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    exclusive: Iterable[Any],
    shared: Iterable[Any],
) -> None:
    """Lock ``exclusive`` and ``shared`` parents in ONE key order, each key in its mode.

    A key in both is locked exclusively. Consecutive keys of one mode go in
    one statement, so a table whose writers are all buffered costs one
    statement per chunk, as before.
    """
    x = {k for k in exclusive if k is not None}
    s = {k for k in shared if k is not None} - x
    run: list[Any] = []
    run_exclusive = False
    for key in sorted(x | s):
        if run and (key in x) != run_exclusive:
            _lock_run(connection, table, pk, run, run_exclusive)
            run = []
        run_exclusive = key in x
        run.append(key)
    if run:
        _lock_run(connection, table, pk, run, run_exclusive)


def _lock_run(
    connection: Connection, table: sa.Table, pk: sa.Column[Any], keys: list[Any], exclusive: bool
) -> None:
    if exclusive:
        lock_parent_keys(connection, table, pk, keys)
    else:
        lock_parent_keys_shared(connection, table, pk, keys)


def scope(pk: sa.Column[Any], lo: Any, hi: Any, ids: Sequence[Any] | None) -> Any:
    """``pk`` in ``[lo, hi)`` (an open end where None) and, given ``ids``, among them."""
    cond: Any = sa.true()
    if lo is not None:
        cond = sa.and_(cond, pk >= lo)
    if hi is not None:
        cond = sa.and_(cond, pk < hi)
    if ids is not None:
        cond = sa.and_(cond, pk.in_(list(ids)))
    return cond


def lock_parents(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
) -> int:
    """Lock the parents of ``[lo, hi)`` (or ``ids``) exclusively in key order; return how many.

    ``SELECT COUNT(*) … FOR UPDATE`` through the primary key walks its index
    in ascending key order and locks each row it passes, as the same SELECT of
    the keys ``ORDER BY pk`` would, without sending thousands of keys back.
    InnoDB has no lock weaker than ``FOR UPDATE`` that still waits for writers
    holding it, and under ``READ COMMITTED`` it takes no gap locks, so new
    parents can still be inserted into the range.
    """
    stmt = (
        sa.select(sa.func.count())
        .select_from(table)
        .with_hint(table, BY_PRIMARY_KEY)
        .where(scope(pk, lo, hi, ids))
        .with_for_update()
    )
    return int(connection.execute(stmt).scalar_one())


def lock_parent_keys(
    connection: Connection, table: sa.Table, pk: sa.Column[Any], keys: Iterable[Any]
) -> None:
    """Lock the parents ``keys`` exclusively in key order (writers, before their child writes).

    Keys this transaction locked already are skipped: InnoDB keeps row locks
    to the end of the transaction, so the flush's deltas, which lock their
    parents again in case some were found late, cost no extra statement.
    """
    held = _held_in_transaction(connection, table)
    ordered = sorted({k for k in keys if k is not None} - held)
    held.update(ordered)
    as_json = isinstance(pk.type, sa.Integer) and all(type(k) is int for k in ordered)
    for start in range(0, len(ordered), CHUNK):
        part = ordered[start : start + CHUNK]
        if as_json:  # one JSON parameter; the join reaches the keys in their (sorted) order
            rows = json.dumps([[k] for k in part])
            connection.execute(_lock_from_json(table, pk), {"deltas": rows}).all()
            continue
        stmt = (
            sa.select(pk)
            .with_hint(table, BY_PRIMARY_KEY)
            .where(pk.in_(part))
            .order_by(pk)
            .with_for_update()
        )
        connection.execute(stmt).all()


def _held_in_transaction(connection: Connection, table: sa.Table) -> set[Any]:
    """The keys of ``table`` this connection's current transaction has locked through us."""
    transaction = connection.get_transaction()
    memo: tuple[Any, dict[str, set[Any]]] | None = connection.info.get(_LOCKED)
    if memo is None or memo[0] is not transaction:
        memo = (transaction, {})
        connection.info[_LOCKED] = memo
    return memo[1].setdefault(table.fullname, set())


def write_truths(
    connection: Connection,
    counters: Sequence[Any],
    rows: Sequence[Any],
) -> int:
    """Write the true values of :func:`.sql.drift_rows` rows (``actual<i>``); return how many.

    The second half of an InnoDB recount. The first half is a plain SELECT of
    the parents whose values differ (at ``READ COMMITTED``, a consistent read
    from a fresh snapshot that locks no child row); this UPDATE then writes
    them by primary key. Between the two, the caller holds the parents'
    exclusive locks, so no writer can apply a delta to them; a writer that
    changed a child but not yet its parent applies its delta after our
    commit, as in the one-statement PostgreSQL recount. A single multi-table
    ``UPDATE parent JOIN (grouped children)`` would instead take shared locks
    on the child rows it reads (MariaDB does, even at ``READ COMMITTED``),
    waiting for writers that wait for our parents: a deadlock.
    """
    if not rows:
        return 0
    table, pk = counters[0].parent_table, counters[0].parent_pk
    if len(rows) <= CASE_CHUNK:
        _write_by_case(connection, counters, rows)
        return len(rows)
    # Many rows: stage them in a temporary table (one multi-row INSERT) and
    # write them with one UPDATE … JOIN, instead of hundreds of CASE branches.
    truths = sa.Table(
        "counterfill_truths",
        sa.MetaData(),
        sa.Column("pk", pk.type, primary_key=True, autoincrement=False),
        *[sa.Column(f"t{i}", c.column.type) for i, c in enumerate(counters)],
        prefixes=["TEMPORARY"],
    )
    connection.exec_driver_sql("DROP TEMPORARY TABLE IF EXISTS counterfill_truths")
    truths.create(connection)
    try:
        connection.execute(
            sa.insert(truths),
            [
                {
                    "pk": r._mapping["pk"],
                    **{f"t{i}": r._mapping[f"actual{i}"] for i in range(len(counters))},
                }
                for r in rows
            ],
        )
        target: Any = table.join(truths, truths.c.pk == pk)
        connection.execute(
            sa.update(target).values({c.column: truths.c[f"t{i}"] for i, c in enumerate(counters)})
        )
    finally:
        connection.exec_driver_sql("DROP TEMPORARY TABLE IF EXISTS counterfill_truths")
    return len(rows)


def _write_by_case(connection: Connection, counters: Sequence[Any], rows: Sequence[Any]) -> None:
    table, pk = counters[0].parent_table, counters[0].parent_pk
    ids = [row._mapping["pk"] for row in rows]
    values = {}
    for i, counter in enumerate(counters):
        whens = {row._mapping["pk"]: row._mapping[f"actual{i}"] for row in rows}
        values[counter.column.name] = sa.case(whens, value=pk, else_=counter.column)
    stmt = sa.update(table).with_hint(BY_PRIMARY_KEY).where(pk.in_(ids)).values(values)
    connection.execute(stmt)


def _delta_rows(columns: Sequence[sa.Column[Any]], count: int) -> Any:
    """``JSON_TABLE(:deltas …) AS v``: columns ``pk`` and ``d<i>``, one row per parent.

    The deltas travel as one JSON text parameter (``[[pk, d0, d1, …], …]``)
    instead of three bound parameters per parent, which pymysql would escape
    one by one and SQLAlchemy would build and compile into a ``CASE`` per
    flush. Names, types and paths are constants of ours.
    """
    spec = ", ".join(
        ["pk BIGINT PATH '$[0]'", *[f"d{i} BIGINT PATH '$[{i + 1}]'" for i in range(count)]]
    )
    return (
        sa.func.json_table(
            sa.bindparam("deltas", type_=sa.String), sa.literal_column(f"'$[*]' COLUMNS ({spec})")
        )
        .table_valued("pk", *[f"d{i}" for i in range(len(columns))])
        .alias("v")
    )


def apply_deltas(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    deltas: Mapping[Any, Mapping[sa.Column[Any], int]],
) -> None:
    """Add each parent's deltas in key order, one UPDATE per chunk.

    Integer keys and deltas (every COUNT, and SUMs of integers) are joined
    from a ``JSON_TABLE`` (:func:`_delta_rows`) whose rows come in key order:
    the UPDATE reaches, and locks, each parent through its primary key in
    that order, exactly as the locking read of :func:`lock_parent_keys`
    would, so parents not locked yet (found during the flush, or written
    by an association-table statement) cost no statement of their own. Other
    types get a ``SET c = c + CASE pk WHEN …`` statement, whose range scan
    is preceded by that locking read of the parents not locked yet.
    """
    ids = sorted(x for x, d in deltas.items() if any(d.values()))
    columns = sorted({col for d in deltas.values() for col in d}, key=lambda c: c.name)
    as_json = _integers(pk, ids, deltas)
    step = CHUNK if as_json else CASE_CHUNK
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        if as_json:
            _add_from_json(connection, table, pk, columns, part, deltas)
            _held_in_transaction(connection, table).update(part)
        else:
            lock_parent_keys(connection, table, pk, part)
            _add_by_case(connection, table, pk, columns, part, deltas)


def add_deltas_locking(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    deltas: Mapping[Any, Mapping[sa.Column[Any], int]],
) -> None:
    """Lock every parent ``deltas`` names exclusively, in key order, adding its deltas (if any).

    The ``JSON_TABLE`` UPDATE of :func:`apply_deltas`, with a row for every
    parent, zero deltas included: InnoDB locks each row the join reaches
    through the primary key, changed or not, in the keys' order, as the
    locking read of :func:`lock_parent_keys` would (integer keys and deltas
    only). Without any delta it is that locking read.
    """
    ids = sorted(deltas)
    columns = sorted({col for d in deltas.values() for col in d}, key=lambda c: c.name)
    if not columns:
        lock_parent_keys(connection, table, pk, ids)
        return
    held = _held_in_transaction(connection, table)
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        _add_from_json(connection, table, pk, columns, part, deltas)
        held.update(part)


def _integers(pk: sa.Column[Any], ids: Sequence[Any], deltas: Mapping[Any, Any]) -> bool:
    if not isinstance(pk.type, sa.Integer) or not all(type(x) is int for x in ids):
        return False
    return all(type(v) is int for x in ids for v in deltas[x].values())


def _add_from_json(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    columns: Sequence[sa.Column[Any]],
    part: Sequence[Any],
    deltas: Mapping[Any, Mapping[sa.Column[Any], int]],
) -> None:
    rows = [[x, *[deltas[x].get(col, 0) for col in columns]] for x in part]
    connection.execute(_add_statement(table, pk, tuple(columns)), {"deltas": json.dumps(rows)})


# The two statements of every InnoDB flush are built once per table (and
# columns), not per flush: a new construct costs its building and its cache
# key (about 0.2-0.4 ms each, against 0.6 ms for the round trip itself).
# Bounded, since tests and short-lived metadata create many tables.
@lru_cache(maxsize=256)
def _lock_from_json(table: sa.Table, pk: sa.Column[Any]) -> Any:
    """``SELECT pk FROM JSON_TABLE(:deltas) STRAIGHT_JOIN table … FOR UPDATE`` (``[[pk], …]``)."""
    v = _delta_rows([], 0)
    return sa.select(pk).select_from(ValuesFirst(table, v, v.c.pk == pk)).with_for_update()


@lru_cache(maxsize=256)
def _add_statement(table: sa.Table, pk: sa.Column[Any], columns: tuple[sa.Column[Any], ...]) -> Any:
    """``UPDATE JSON_TABLE(:deltas) STRAIGHT_JOIN table SET c<i> = c<i> + d<i>`` for ``columns``."""
    v = _delta_rows(columns, len(columns))
    return sa.update(ValuesFirst(table, v, v.c.pk == pk)).values(
        {col: col + v.c[f"d{i}"] for i, col in enumerate(columns)}
    )


def _add_by_case(
    connection: Connection,
    table: sa.Table,
    pk: sa.Column[Any],
    columns: Sequence[sa.Column[Any]],
    part: Sequence[Any],
    deltas: Mapping[Any, Mapping[sa.Column[Any], int]],
) -> None:
    values = {}
    for col in columns:
        whens = {x: deltas[x].get(col, 0) for x in part if deltas[x].get(col, 0)}
        if whens:
            values[col.name] = col + sa.case(whens, value=pk, else_=0)
    if values:
        stmt = sa.update(table).with_hint(BY_PRIMARY_KEY).where(pk.in_(part))
        connection.execute(stmt.values(values))


def read_committed_transaction(connection: Connection) -> None:
    """Run the connection's next transaction at :data:`ISOLATION`; call before its first statement.

    ``SET TRANSACTION`` (no ``SESSION``) lasts one transaction: one round trip,
    where SQLAlchemy's ``isolation_level`` execution option spends four per
    checkout (``SET SESSION …`` and ``COMMIT``, then both again to restore
    the level at checkin), a fixed cost every short batch transaction pays.
    """
    connection.exec_driver_sql(f"SET TRANSACTION ISOLATION LEVEL {ISOLATION}")


def bound_lock_waits(connection: Connection, timeout_ms: int) -> None:
    """Make this connection's lock waits end after ``timeout_ms`` (rounded up to whole seconds).

    InnoDB's own bound (``innodb_lock_wait_timeout``) is per session; it is
    restored to the server default when the connection goes back to the pool.
    """
    seconds = max(1, -(-int(timeout_ms) // 1000))
    connection.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {seconds:d}")
    engine = connection.engine
    if not event.contains(engine, "checkin", _restore_lock_wait):
        event.listen(engine, "checkin", _restore_lock_wait)
    connection.info[_LOCK_WAIT] = True


def _restore_lock_wait(dbapi_connection: Any, record: Any) -> None:
    if record.info.pop(_LOCK_WAIT, None):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = DEFAULT")
        finally:
            cursor.close()


def update_returning(
    connection: Connection, stmt: sa.Update, where: Any, *columns: sa.ColumnElement[Any]
) -> Any:
    """Run ``stmt`` and return ``columns`` of the row it changed (``None``: no row matched).

    ``UPDATE … RETURNING`` where the database has it; elsewhere the UPDATE,
    then a read of the row, which the UPDATE has locked, so nobody changed it
    in between (and a transaction reads its own writes at any isolation level).
    """
    if connection.dialect.update_returning:
        return connection.execute(stmt.returning(*columns)).first()
    if connection.execute(stmt).rowcount == 0:
        return None
    return connection.execute(sa.select(*columns).where(where)).first()


def hold_named_lock(connection: Connection, name: str, timeout_s: int = 600) -> None:
    """Take MySQL's session-level ``GET_LOCK(name)``, released when the connection is checked in.

    ``GET_LOCK`` outlives transactions, so releasing it when the connection
    goes back to the pool (after the caller's commit) keeps it for exactly as
    long as PostgreSQL's ``pg_advisory_xact_lock`` would be kept.
    """
    got = connection.execute(sa.select(sa.func.get_lock(name, timeout_s))).scalar()
    if got != 1:
        raise CounterfillError(
            f"another process held the lock {name!r} for {timeout_s}s; "
            "wait for the other `enqueue` to finish, then run it again"
        )
    engine = connection.engine
    if not event.contains(engine, "checkin", _release_named_locks):
        event.listen(engine, "checkin", _release_named_locks)
    connection.info.setdefault(_HELD, []).append(name)


def _release_named_locks(dbapi_connection: Any, record: Any) -> None:
    names = record.info.pop(_HELD, None)
    if not names:
        return
    cursor = dbapi_connection.cursor()
    try:
        for name in names:
            cursor.execute("SELECT RELEASE_LOCK(%s)", (name,))
    finally:
        cursor.close()


def reads_latest(connection: Connection) -> bool:
    """Whether a plain read in this transaction sees the latest committed rows (no old snapshot)."""
    level = str(connection.get_isolation_level()).upper().replace("-", " ")
    return level in ("READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT")


def recount_in_transaction(
    connection: Connection,
    counters: Sequence[Any],
    ids: Sequence[Any],
    aggregate: Any,
) -> int:
    """Set the counters of parents ``ids`` to their truth inside an application's transaction.

    Under ``READ COMMITTED`` a plain read sees the latest committed rows and
    our own, without locking any child. ``REPEATABLE READ`` (InnoDB's default)
    would answer from the transaction's first snapshot, so there the truth is
    read with locking reads (``LOCK IN SHARE MODE``); those wait for writers
    holding child rows, which may in turn wait for our parents: one more
    reason to run InnoDB writers at ``READ COMMITTED`` (docs/databases.md).
    Only the parents whose values differ are written. The caller holds the
    parents' exclusive locks already. Returns rows changed.

    :param aggregate: ``aggregate(counter)`` is the per-row SQL to add up
        (:func:`.sql.contribution`).
    """
    table, pk = counters[0].parent_table, counters[0].parent_pk
    ids = sorted(set(ids))
    truth: dict[Any, dict[int, Any]] = {x: {} for x in ids}
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, counter in enumerate(counters):
        groups.setdefault((counter.child_table, counter.fk), []).append(i)
    latest = reads_latest(connection)
    for (_, fk), members in groups.items():
        stmt = (
            sa.select(fk, *[sa.func.sum(aggregate(counters[i])) for i in members])
            .where(fk.in_(ids))
            .group_by(fk)
        )
        if not latest:
            stmt = stmt.with_for_update(read=True)
        for row in connection.execute(stmt):
            for j, i in enumerate(members):
                truth[row[0]][i] = row[j + 1] or 0
    current = (
        sa.select(pk, *[c.column for c in counters])
        .with_hint(table, BY_PRIMARY_KEY)
        .where(pk.in_(ids))
        .order_by(pk)
        .with_for_update()
    )
    changes: dict[Any, dict[int, Any]] = {}
    for row in connection.execute(current):
        for i in range(len(counters)):
            want = truth[row[0]].get(i, 0)
            if row[i + 1] != want:
                changes.setdefault(row[0], {})[i] = want
    if not changes:
        return 0
    values = {}
    for i, counter in enumerate(counters):
        whens = {x: c[i] for x, c in changes.items() if i in c}
        if whens:
            values[counter.column.name] = sa.case(whens, value=pk, else_=counter.column)
    update = sa.update(table).with_hint(BY_PRIMARY_KEY).where(pk.in_(list(changes)))
    connection.execute(update.values(values))
    return len(changes)
