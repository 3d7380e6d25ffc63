"""Plan backfills: choose counters, cut each parent table into key ranges, record runs and batches.

Planning happens in one transaction that is committed before any message is
sent, so a batch id in a message always names a recorded batch, and a crash
at any point leaves either nothing or a complete plan that ``enqueue`` resumes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import definition, innodb
from . import progress as p
from .counters import Counter, select_counters
from .errors import CounterfillError
from .pacing import START_SIZE

# Serialises concurrent planners (two `enqueue` at once must not both plan the
# same counter); an arbitrary constant private to this library, and its
# GET_LOCK name on MariaDB/MySQL (named locks there are server-wide: the name
# carries the database so that two databases on one server plan independently).
_PLANNING_LOCK = 0x636F756E74657266
_PLANNING_LOCK_NAME = "counterfill.planning"


#: Python types of primary keys that planning can cut into ranges: ordered by
#: the database, and stored as JSON text that decodes to an equal value.
KEY_TYPES: tuple[type, ...] = (
    int,
    str,
    float,
    decimal.Decimal,
    dt.datetime,
    dt.date,
    dt.time,
    uuid.UUID,
)


def key_type(column: sa.Column[Any]) -> type | None:
    """The Python type of ``column``'s values if planning supports it as a key, else None."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return None
    if kind is bool:
        return None
    return kind if any(issubclass(kind, t) for t in KEY_TYPES) else None


def check_key(counter: Counter) -> None:
    """Refuse a counter whose parent key cannot be cut into ranges, naming the fix."""
    pk = counter.parent_pk
    if key_type(pk) is None:
        raise CounterfillError(
            f"cannot backfill {counter.key}: primary key {pk.table.name}.{pk.name} has type "
            f"{pk.type}, which cannot be cut into key ranges; give {pk.table.name} an integer, "
            "string, decimal, date/time or UUID primary key (or fill the counter with "
            "`verify --fix`)"
        )


def encode_key(value: Any) -> str | None:
    """Store a primary-key bound as JSON text (``None`` = open end)."""
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        return json.dumps(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return json.dumps(value.isoformat())
    return json.dumps(str(value))  # UUID, Decimal: their text form round-trips


def decode_key(column: sa.Column[Any], text: str | None) -> Any:
    """Turn a stored bound back into a value of ``column``'s Python type."""
    if text is None:
        return None
    value = json.loads(text)
    kind = key_type(column)
    if kind is None or isinstance(value, kind) and not isinstance(value, bool):
        return value
    if kind is uuid.UUID:
        return uuid.UUID(value)
    if issubclass(kind, dt.datetime):
        return dt.datetime.fromisoformat(value)
    if issubclass(kind, dt.date):
        return dt.date.fromisoformat(value)
    if issubclass(kind, dt.time):
        return dt.time.fromisoformat(value)
    return kind(value)  # type: ignore[call-arg]  # int, str, float, Decimal


def key_text(value: Any, *, upper: bool = False) -> str:
    """A range bound for people: the key, or ``-inf``/``+inf`` for an open end."""
    if value is None:
        return "+inf" if upper else "-inf"
    return str(value)


def range_text(lo_text: str | None, hi_text: str | None) -> str:
    """``[lo, hi)`` of a batch row's stored (JSON) bounds, open ends as ``-inf``/``+inf``."""
    lo = json.loads(lo_text) if lo_text is not None else None
    hi = json.loads(hi_text) if hi_text is not None else None
    return f"[{key_text(lo)}, {key_text(hi, upper=True)})"


def next_boundary(
    connection: Connection, pk: sa.Column[Any], current: Any, batch_size: int
) -> Any | None:
    """The key ``batch_size`` entries past ``current`` in the primary-key index (None: the end).

    ``current=None`` starts at the table's first key.
    """
    stmt = sa.select(pk).order_by(pk).offset(batch_size).limit(1)
    if current is not None:
        stmt = stmt.where(pk >= current)
    return connection.execute(stmt).scalar()


def boundaries(connection: Connection, pk: sa.Column[Any], batch_size: int) -> Iterator[Any]:
    """Yield the first key of every batch but the first, walking the primary-key index.

    Each step reads ``batch_size`` index entries past the previous boundary:
    short statements, whole table covered once, and no more than one key in
    memory, whatever the key type (integers, UUIDs, strings).
    """
    current = None
    while True:
        current = next_boundary(connection, pk, current, batch_size)
        if current is None:
            return
        yield current


@dataclass
class BackfillPlan:
    """What planning recorded: the runs to drive and the batches still to run."""

    run_ids: list[int] = field(default_factory=list)
    new_run_ids: list[int] = field(default_factory=list)
    resumed_run_ids: list[int] = field(default_factory=list)
    batch_ids: list[int] = field(default_factory=list)  # not done, to (re)send
    counter_keys: list[str] = field(default_factory=list)


def check_choice(names: Sequence[str], everything: bool) -> None:
    """Counter names or ``--all``, not both: raise :class:`~.errors.CounterfillError` otherwise."""
    if names and everything:
        raise CounterfillError("give counter names or --all, not both")


def choose(
    connection: Connection, counters: Sequence[Counter], names: Sequence[str], everything: bool
) -> list[Counter]:
    """The counters ``enqueue`` should fill: those named, all (``--all``), or all not active.

    Raises :class:`~.errors.UnknownCounterError` naming an unknown counter.
    """
    check_choice(names, everything)
    if names:
        return select_counters(counters, names)
    if everything:
        return list(counters)
    recorded = p.counter_rows(connection)
    return [c for c in counters if c.key in recorded and recorded[c.key]["state"] != p.ACTIVE]


@dataclass(frozen=True)
class Sizing:
    """How a run's transactions are sized.

    :param pinned: an explicit ``--batch-size``: every transaction is one
        whole planned range. Otherwise the size adapts (:mod:`.pacing`),
        starting at ``start`` and never above the planned range.
    :param max_rows_per_second: optional rate limit of the run (parents).
    """

    pinned: bool = False
    start: int = START_SIZE
    max_rows_per_second: float | None = None


def plan(
    connection: Connection,
    chosen: Sequence[Counter],
    batch_size: int,
    sizing: Sizing | None = None,
    *,
    declared: Sequence[Counter] | None = None,
) -> BackfillPlan:
    """Record runs and batches for ``chosen`` in the caller's transaction; resume unfinished runs.

    A counter whose recorded run is not done resumes that run (failed batches
    are reset, done batches stay done); the others get one new run per parent
    table covering all of them, so a table is recounted in one pass. A run
    that can no longer finish as planned (one of its counters is no longer
    declared, or is defined differently from when it was planned) is
    ``superseded``: its still-declared counters join the new runs.

    :param batch_size: parents per planned range (a batch); with an adaptive
        size, the upper bound of one transaction.
    :param sizing: pinned or adaptive size, and the rate limit; a resumed run
        takes a pinned size and the rate limit from it (its ranges stay as planned).
    :param declared: every counter the models declare, to tell removed
        counters from counters merely not chosen; without it, only a changed
        definition supersedes a run.
    """
    sizing = sizing or Sizing()
    if batch_size < 1:
        raise CounterfillError(f"batch size must be at least 1, got {batch_size}")
    for counter in chosen:
        check_key(counter)
    p.ensure_tables(connection)
    _lock_planning(connection)
    known = {c.key: c for c in (declared if declared is not None else chosen)}
    known.update((c.key, c) for c in chosen)
    current = definition.fingerprints(known)
    recorded = p.counter_rows(connection)
    run_ids = {r["run_id"] for r in recorded.values() if r["run_id"] is not None}
    runs = {
        r["id"]: r
        for r in connection.execute(
            sa.select(p.runs_table).where(p.runs_table.c.id.in_(run_ids))
        ).mappings()
    }
    result = BackfillPlan(counter_keys=sorted(c.key for c in chosen))
    fresh: dict[sa.Table, list[Counter]] = {}
    todo = list(chosen)
    superseded: set[int] = set()
    while todo:
        counter = todo.pop(0)
        if any(counter in group for group in fresh.values()):
            continue
        row = recorded.get(counter.key)
        run = runs.get(row["run_id"]) if row is not None else None
        if (
            run is not None
            and run["state"] not in p.RUN_ENDED
            and counter.key in run["counter_keys"].split(",")
            and run["id"] not in superseded
        ):
            if _still_valid(run, current, complete=declared is not None):
                if run["id"] not in result.resumed_run_ids:
                    result.resumed_run_ids.append(run["id"])
                continue
            superseded.add(run["id"])
            # Its other declared counters were requested too: plan them anew.
            todo.extend(known[k] for k in run["counter_keys"].split(",") if k in known)
        fresh.setdefault(counter.parent_table, []).append(counter)
    for run_id in sorted(superseded):
        _supersede(connection, run_id)
    for run_id in result.resumed_run_ids:
        _resume(connection, run_id, sizing, batch_size)
    for group in fresh.values():
        result.new_run_ids.append(
            _new_run(connection, group, batch_size, recorded, sizing, current)
        )
    result.run_ids = result.resumed_run_ids + result.new_run_ids
    b = p.batches_table
    result.batch_ids = list(
        connection.execute(
            sa.select(b.c.id)
            .where(b.c.run_id.in_(result.run_ids), b.c.state != p.BATCH_DONE)
            .order_by(b.c.run_id, b.c.seq)
        ).scalars()
    )
    return result


def _lock_planning(connection: Connection) -> None:
    """Serialise planners, so two concurrent ``enqueue`` plan one run between them.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: a write that
    changes nothing, which takes the database's write lock before anything is
    read (pysqlite starts the transaction only at the first write, so reads
    before it would see a state another planner is about to change).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PLANNING_LOCK)))
    elif innodb.is_innodb(connection.dialect):
        database = connection.execute(sa.select(sa.func.database())).scalar()
        innodb.hold_named_lock(connection, f"{_PLANNING_LOCK_NAME}.{database}"[:64])
    elif connection.dialect.name == "sqlite":
        r = p.runs_table
        connection.execute(sa.update(r).where(sa.false()).values(state=r.c.state))


def _still_valid(run: Any, current: dict[str, str], *, complete: bool) -> bool:
    """Whether every counter of ``run`` is declared, with the definition it was planned under.

    :param complete: ``current`` lists every declared counter, so a key
        missing from it was removed (else it may merely not be known here).
    """
    planned = p.run_fingerprints(run)
    for key in run["counter_keys"].split(","):
        if key not in current:
            if complete:
                return False
            continue
        if planned and planned.get(key) != current[key]:
            return False
    return True


def _supersede(connection: Connection, run_id: int) -> None:
    """End ``run_id`` unfinished: its batches are skipped if still delivered."""
    r = p.runs_table
    connection.execute(
        sa.update(r).where(r.c.id == run_id).values(state=p.RUN_SUPERSEDED, finished_at=p.now())
    )
    connection.execute(p.release_statement())


def _resume(connection: Connection, run_id: int, sizing: Sizing, batch_size: int) -> None:
    b, r, c = p.batches_table, p.runs_table, p.counters_table
    values: dict[str, Any] = {}
    if sizing.pinned:
        # The ranges are cut already: a pinned size applies to each
        # transaction, up to one whole range (`enqueue` says so).
        planned = connection.execute(sa.select(r.c.batch_size).where(r.c.id == run_id)).scalar_one()
        values = {"pinned": True, "chunk_size": min(batch_size, planned)}
    if sizing.max_rows_per_second is not None:
        values["max_rows_per_second"] = sizing.max_rows_per_second or None
    reset = connection.execute(
        sa.update(b)
        .where(b.c.run_id == run_id, b.c.state == p.BATCH_FAILED)
        .values(state=p.BATCH_PENDING, finished_at=None)
    ).rowcount
    # Not a run that ended since it was read: its last batch may have
    # committed meanwhile, and no batch would be left to end it again.
    connection.execute(
        sa.update(r)
        .where(r.c.id == run_id, r.c.state.not_in(p.RUN_ENDED))
        .values(
            state=p.RUN_RUNNING,
            finished_at=None,
            resumed_at=p.now(),
            batches_failed=r.c.batches_failed - reset,
            **values,
        )
    )
    connection.execute(
        sa.update(c)
        .where(c.c.run_id == run_id, c.c.state.in_([p.FAILED, p.PENDING]))
        .values(state=p.BACKFILLING, updated_at=p.now())
    )


def _new_run(
    connection: Connection,
    group: list[Counter],
    batch_size: int,
    recorded: dict[str, Any],
    sizing: Sizing,
    current: dict[str, str],
) -> int:
    group = sorted(group, key=lambda c: c.key)
    table, pk = group[0].parent_table, group[0].parent_pk
    now = p.now()
    paused = any(c.key in recorded and recorded[c.key]["state"] == p.PAUSED for c in group)
    # inserted_primary_key: RETURNING where the database has it, else the
    # driver's last insert id (MySQL has no INSERT … RETURNING).
    inserted = connection.execute(
        sa.insert(p.runs_table).values(
            table_name=table.name,
            counter_keys=",".join(c.key for c in group),
            batch_size=batch_size,
            state=p.RUN_RUNNING,
            created_at=now,
            fingerprints=json.dumps({c.key: current[c.key] for c in group}, sort_keys=True),
            pinned=sizing.pinned,
            chunk_size=batch_size if sizing.pinned else min(sizing.start, batch_size),
            max_rows_per_second=sizing.max_rows_per_second,
            parents_done=0,
            # A counter paused before its run existed: the run starts paused.
            paused_at=now if paused else None,
        )
    ).inserted_primary_key
    assert inserted is not None
    run_id = int(inserted[0])
    bounds = [None, *boundaries(connection, pk, batch_size), None]
    rows = [
        {
            "run_id": run_id,
            "seq": i,
            "lo": encode_key(lo),
            "hi": encode_key(hi),
            "state": p.BATCH_PENDING,
        }
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]
    connection.execute(sa.insert(p.batches_table), rows)
    tail = sa.select(sa.func.count()).select_from(table)
    if bounds[-2] is not None:
        tail = tail.where(pk >= bounds[-2])
    parents = (len(rows) - 1) * batch_size + connection.execute(tail).scalar_one()
    connection.execute(
        sa.update(p.runs_table)
        .where(p.runs_table.c.id == run_id)
        .values(batches_total=len(rows), parents_total=parents)
    )
    c = p.counters_table
    for counter in group:
        values = {
            "state": p.PAUSED if paused else p.BACKFILLING,
            "run_id": run_id,
            "updated_at": now,
        }
        if counter.key in recorded:
            connection.execute(sa.update(c).where(c.c.key == counter.key).values(values))
        else:
            # No row: the counter's state is unknown (its column may never
            # have been filled), so the read helper counts live until the
            # run completes.
            connection.execute(
                sa.insert(c).values(
                    key=counter.key,
                    table_name=table.name,
                    column_name=counter.name,
                    schema_name=table.schema,
                    **values,
                )
            )
    return run_id
