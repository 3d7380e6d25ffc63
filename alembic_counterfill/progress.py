"""Progress store: bookkeeping tables recording requests, runs and batches in the app's database.

Completion and recovery live here, not in the broker: a batch is done when its
row says so, and ``enqueue`` re-sends whatever is not.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

from .errors import DatabaseError

#: MetaData of the library's own tables; never part of the user's models.
bookkeeping = sa.MetaData()

#: Counter states, in lifecycle order.
PENDING, BACKFILLING, ACTIVE, FAILED = "pending", "backfilling", "active", "failed"

#: A declared counter with no record: never requested, backfilled or verified.
UNKNOWN = "unknown"

#: Run states: batches outstanding, all done, or all finished with some failed.
RUN_RUNNING, RUN_DONE, RUN_FAILED = "running", "done", "failed"

#: Run states of runs that ended unfinished: by ``cancel``, or replaced by a new
#: run because a counter of theirs was removed or redefined.
RUN_CANCELLED, RUN_SUPERSEDED = "cancelled", "superseded"
RUN_ENDED = (RUN_DONE, RUN_CANCELLED, RUN_SUPERSEDED)

#: Batch states: planned, handed to the broker, applied, out of retries.
BATCH_PENDING, BATCH_SENT, BATCH_DONE, BATCH_FAILED = "pending", "sent", "done", "failed"

#: Older names of run and batch states (the library uses the prefixed ones above).
RUNNING, DONE, SENT = RUN_RUNNING, RUN_DONE, BATCH_SENT

#: A counter whose batches workers leave for later (``pause``/``resume``).
PAUSED = "paused"

#: Seconds since a worker's last heartbeat after which it counts as gone.
WORKER_ALIVE_SECONDS = 30.0

#: Seconds over which ``status`` measures the rate (recent, not since planning).
RATE_WINDOW_SECONDS = 30.0

counters_table = sa.Table(
    "counterfill_counters",
    bookkeeping,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("column_name", sa.String(128), nullable=False),
    sa.Column("schema_name", sa.String(128), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("run_id", sa.Integer, nullable=True),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
    # When the counter first became exact (NULL until a backfill completes, or
    # when recorded for an implicitly active counter). A recount of a counter
    # that was active keeps it set, so the read helper can keep trusting the
    # live-maintained cache while the recount runs.
    sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
    # The definition (see definition.py) the column's values follow: recorded
    # when a backfill is requested and when one completes.
    sa.Column("fingerprint", sa.String(64), nullable=True),
    sa.Column("definition", sa.Text, nullable=True),  # JSON: the parts, to say what changed
)

runs_table = sa.Table(
    "counterfill_runs",
    bookkeeping,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("counter_keys", sa.Text, nullable=False),  # comma-separated, sorted
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # running, done, failed
    sa.Column("batches_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("batches_done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("batches_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_changed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    # Set when `enqueue` resumes the run: rate and ETA count from there.
    sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
    # JSON {counter key: fingerprint} of the models that planned the run: a
    # worker whose models differ refuses its batches.
    sa.Column("fingerprints", sa.Text, nullable=True),
    # Adaptive batches (added in 0.2; `ensure_tables` adds them to older
    # installs): the size the next batch transaction is cut with, whether an
    # explicit --batch-size pinned it, and the controller's time estimate.
    sa.Column("chunk_size", sa.Integer, nullable=True),
    sa.Column("pinned", sa.Boolean, nullable=True),
    sa.Column("seconds_per_parent", sa.Float, nullable=True),
    sa.Column("pacing_history", sa.Text, nullable=True),  # JSON, see pacing.History
    sa.Column("parents_total", sa.BigInteger, nullable=True),
    sa.Column("parents_done", sa.BigInteger, nullable=True),
    # Recent-window rate: parents since window_started_at, and the last full window's rate.
    sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("window_parents", sa.BigInteger, nullable=True),
    sa.Column("window_rate", sa.Float, nullable=True),
    sa.Column("last_batch_at", sa.DateTime(timezone=True), nullable=True),
    # Throttling: why the last batch backed off, and when.
    sa.Column("throttle_reason", sa.Text, nullable=True),
    sa.Column("throttled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
    # Rate limit (parents per second) and the earliest start of the next batch under it.
    sa.Column("max_rows_per_second", sa.Float, nullable=True),
    sa.Column("rate_next_at", sa.DateTime(timezone=True), nullable=True),
)

batches_table = sa.Table(
    "counterfill_batches",
    bookkeeping,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "run_id", sa.Integer, sa.ForeignKey("counterfill_runs.id"), nullable=False, index=True
    ),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("lo", sa.Text, nullable=True),  # JSON-encoded key bound, inclusive; NULL = open
    sa.Column("hi", sa.Text, nullable=True),  # JSON-encoded key bound, exclusive; NULL = open
    # pending (planned), sent, done, failed
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("rows_changed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    # Deliveries refused by workers whose models define the counters differently.
    sa.Column("refusals", sa.Integer, nullable=False, server_default="0"),
    # Where the next transaction of this range starts (JSON key; NULL = at lo).
    sa.Column("cursor", sa.Text, nullable=True),
    # Messages published for the batch (by enqueue, or by a worker deferring it);
    # sent_at is the last one's time. See resend.py.
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),
)

workers_table = sa.Table(
    "counterfill_workers",
    bookkeeping,
    sa.Column("id", sa.String(255), primary_key=True),  # host:pid
    sa.Column("queue", sa.String(255), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
)

TABLE_NAMES = frozenset(t.name for t in bookkeeping.tables.values())


def now() -> dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return dt.datetime.now(dt.timezone.utc)


# Serialises creation of the bookkeeping tables on PostgreSQL, where two
# concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog.
_DDL_LOCK = 0x636F756E74646466


def ensure_tables(connection: Connection) -> None:
    """Create the bookkeeping tables if they are missing, and add columns newer versions need.

    Schema changes are additive only (nullable columns), so tables created by
    an older version are brought up to date in place by the next ``enqueue``,
    ``pause``/``resume`` or worker start.
    """
    present = _present_columns(connection)
    if all(t.name in present for t in bookkeeping.sorted_tables):
        if _outdated(present):
            add_missing_columns(connection)
        return
    # CREATE ... IF NOT EXISTS, serialised on PostgreSQL by a transaction-scoped
    # advisory lock: several processes creating them at once do not collide
    # (two concurrent IF NOT EXISTS can still clash on PostgreSQL's catalog).
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK)))
    for table in bookkeeping.sorted_tables:
        connection.execute(CreateTable(table, if_not_exists=True))
        if connection.dialect.name in ("mysql", "mariadb"):
            continue  # MySQL 8 has no CREATE INDEX IF NOT EXISTS; InnoDB indexes FKs
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            connection.execute(CreateIndex(index, if_not_exists=True))
    add_missing_columns(connection)


def outdated_columns(connection: Connection) -> list[tuple[sa.Table, sa.Column[Any]]]:
    """Bookkeeping columns that existing tables lack (created by an older release)."""
    return _outdated(_present_columns(connection))


def _present_columns(connection: Connection) -> dict[str, set[str]]:
    """Column names of each bookkeeping table that exists.

    One reflection of the tables together (one catalog query on PostgreSQL):
    a table at a time cost two queries each, run twice by every ``enqueue``.
    """
    names = [t.name for t in bookkeeping.sorted_tables]
    found = sa.inspect(connection).get_multi_columns(filter_names=names)
    return {name: {c["name"] for c in columns} for (_, name), columns in found.items()}


def _outdated(present: Mapping[str, set[str]]) -> list[tuple[sa.Table, sa.Column[Any]]]:
    return [
        (table, column)
        for table in bookkeeping.sorted_tables
        if table.name in present
        for column in table.columns
        if column.name not in present[table.name]
    ]


def add_missing_columns(connection: Connection) -> None:
    """``ALTER TABLE … ADD COLUMN`` for each bookkeeping column an older install lacks.

    Race-free as table creation is: on PostgreSQL the same transaction-scoped
    advisory lock serialises upgraders, and each looks again once it holds it;
    elsewhere (DDL that commits at once, or SQLite's single writer) a column
    another process added meanwhile makes ``ADD COLUMN`` fail, which is fine.
    """
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    missing = outdated_columns(connection)
    if not missing:
        return
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK)))
        missing = outdated_columns(connection)  # another process may have added them
    ops = Operations(MigrationContext.configure(connection))
    for table, column in missing:
        try:
            ops.add_column(table.name, column._copy())
        except sa.exc.DBAPIError:
            if postgresql:  # cannot race there, so a real error (e.g. no ALTER privilege)
                raise
            present = {c["name"] for c in sa.inspect(connection).get_columns(table.name)}
            if column.name not in present:
                raise


def upgrade_tables(engine: sa.Engine) -> None:
    """Add the columns newer versions need to bookkeeping tables an older release created.

    ``status``, ``verify`` and ``cancel`` call it, so an install upgraded
    without running ``enqueue`` or a worker reads its bookkeeping; nothing
    happens when the tables are current or absent. Raises
    :class:`~.errors.DatabaseError` (one line, naming the fix) if the
    database user may not alter them.
    """
    with engine.connect() as conn:
        missing = [f"{t.name}.{c.name}" for t, c in outdated_columns(conn)]
    if not missing:
        return
    try:
        with engine.begin() as conn:
            add_missing_columns(conn)
    except sa.exc.DBAPIError as exc:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise DatabaseError(
            f"the bookkeeping tables were created by an older alembic_counterfill and lack "
            f"{shown}; adding them failed ({detail}): run `alembic counterfill enqueue` "
            "once as a database user allowed to ALTER the counterfill_* tables"
        ) from None


def has_tables(connection: Connection) -> bool:
    """Whether the bookkeeping tables exist (no request was ever recorded if not)."""
    return sa.inspect(connection).has_table(counters_table.name)


def request_statements(
    key: str,
    table: str,
    column: str,
    schema: str | None,
    *,
    fingerprint: str | None = None,
    definition: str | None = None,
) -> list[Any]:
    """Statements recording ``key`` as pending (delete + insert: portable, renders offline).

    An unfinished run of the counter is ended first (``superseded``): it was
    planned for what the column meant before this request.
    """
    return [
        *end_runs_statements(key, RUN_SUPERSEDED),
        sa.delete(counters_table).where(counters_table.c.key == key),
        sa.insert(counters_table).values(
            key=key,
            table_name=table,
            column_name=column,
            schema_name=schema,
            state=PENDING,
            requested_at=now(),
            updated_at=now(),
            fingerprint=fingerprint,
            definition=definition,
        ),
    ]


def end_runs_statements(key: str, state: str) -> list[Any]:
    """Statements ending the unfinished run of counter ``key``, in SQL only (renders offline).

    The counters of that run go back to ``active`` if they were exact before
    the run (a recount), else to ``pending``; ``enqueue`` plans anew.
    """
    r, c = runs_table, counters_table
    its_run = sa.select(c.c.run_id).where(c.c.key == key).scalar_subquery()
    return [
        sa.update(r)
        .where(r.c.id == its_run, r.c.state.not_in(RUN_ENDED))
        .values(state=state, finished_at=sa.func.now()),
        release_statement(),
    ]


def release_statement() -> Any:
    """Detach counters from runs that ended unfinished (``active`` if exact before, else pending).

    A counter attached to a cancelled or superseded run is never a valid
    state, so this touches only counters that need it, whichever run ended.
    """
    r, c = runs_table, counters_table
    ended = sa.select(r.c.id).where(r.c.state.in_([RUN_CANCELLED, RUN_SUPERSEDED]))
    back = sa.case((c.c.activated_at.is_not(None), ACTIVE), else_=PENDING)
    return (
        sa.update(c)
        .where(c.c.run_id.in_(ended))
        .values(state=back, run_id=None, updated_at=sa.func.now())
    )


def unrequest_statements(key: str) -> list[Any]:
    """Statements removing the request (and any state) recorded for ``key``, ending its run."""
    return [
        *end_runs_statements(key, RUN_CANCELLED),
        sa.delete(counters_table).where(counters_table.c.key == key),
    ]


#: Seconds after which a throttle reason is no longer shown as current.
THROTTLE_SHOWN_SECONDS = 60.0

#: Seconds without a finished batch (and no live worker) after which a run is ``stalled``.
STALLED_SECONDS = 15.0


@dataclass
class CounterStatus:
    """What ``status`` shows for one declared counter."""

    counter: str
    state: str
    batches_done: int = 0
    batches_total: int = 0
    batches_failed: int = 0
    rows_changed: int = 0
    rate: float | None = None  # parents per second over the recent window
    eta_seconds: float | None = None
    last_error: str | None = None
    # The running code defines the counter differently from the recorded definition.
    definition_changed: bool = False
    # Batches refused by workers whose models define the counters differently.
    batches_waiting: int = 0
    # What to do next, when the state needs an action (unknown, changed, missing column).
    hint: str | None = None
    #: Adaptive size of the next batch transaction (parents), and whether --batch-size pinned it.
    batch_size: int | None = None
    pinned: bool = False
    parents_done: int | None = None
    parents_total: int | None = None
    #: Seconds since a batch transaction of the run last committed.
    last_batch_seconds_ago: float | None = None
    #: Why batches backed off recently (lock waiters, lock timeout, autovacuum, replica lag).
    throttled: str | None = None
    #: Batches whose last attempt failed and that will be retried.
    retrying: int = 0
    #: Worker processes with a recent heartbeat (all queues).
    workers_alive: int = 0
    #: running, throttled, stalled or paused while backfilling; None otherwise.
    activity: str | None = None
    max_rows_per_second: float | None = None
    # Buffered counters only: delta rows waiting for a fold, and the oldest one's age.
    pending_deltas: int | None = None
    oldest_delta_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON object ``status --json`` prints for this counter."""
        return dict(self.__dict__)


def alive_workers(connection: Connection, queue: str | None = None) -> int:
    """Worker processes with a recent heartbeat (0 before any worker ran), on ``queue`` if given."""
    if not sa.inspect(connection).has_table(workers_table.name):
        return 0
    w = workers_table
    since = now() - dt.timedelta(seconds=WORKER_ALIVE_SECONDS)
    stmt = sa.select(sa.func.count()).select_from(w).where(w.c.seen_at >= since)
    if queue is not None:
        stmt = stmt.where(w.c.queue == queue)
    return connection.execute(stmt).scalar_one()


def counter_rows(connection: Connection) -> dict[str, Any]:
    """The recorded row of each counter that has one, by key (empty before any request)."""
    if not has_tables(connection):
        return {}
    rows = connection.execute(sa.select(counters_table)).mappings().all()
    return {r["key"]: r for r in rows}


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _window_rate(run: Any, at: dt.datetime) -> float | None:
    """Parents per second over the recent window (not since planning, not across a pause)."""
    start = run["window_started_at"]
    if start is None:
        return None
    elapsed = (at - _aware(start)).total_seconds()
    parents = run["window_parents"] or 0
    if elapsed < 5 and run["window_rate"]:
        return float(run["window_rate"])  # the window just opened: the last full one
    return parents / elapsed if parents and elapsed > 0 else None


def statuses(
    connection: Connection, keys: list[str], fingerprints: Mapping[str, str] | None = None
) -> list[CounterStatus]:
    """Status of each declared counter key, in the given order.

    A counter with no recorded row is ``unknown``: nothing says its column
    was ever filled (created with its table, or added by a migration that
    did not request a backfill). ``verify`` or ``enqueue`` records it.

    :param fingerprints: the running code's definition of each counter, to
        flag ``definition_changed`` against the recorded one.
    """
    recorded = counter_rows(connection)
    run_ids = {r["run_id"] for r in recorded.values() if r["run_id"] is not None}
    runs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    waiting: dict[int, int] = {}
    retrying: dict[int, int] = {}
    if run_ids:
        for run_row in connection.execute(
            sa.select(runs_table).where(runs_table.c.id.in_(run_ids))
        ).mappings():
            runs[run_row["id"]] = run_row
        b = batches_table
        failed = connection.execute(
            sa.select(b.c.run_id, b.c.error)
            .where(b.c.run_id.in_(run_ids), b.c.state == BATCH_FAILED)
            .order_by(b.c.finished_at)
        )
        for run_id, error in failed:
            errors[run_id] = error
        for run_id, count, error in connection.execute(
            sa.select(b.c.run_id, sa.func.count(), sa.func.max(b.c.error))
            .where(b.c.run_id.in_(run_ids), b.c.state != BATCH_DONE, b.c.state != BATCH_FAILED)
            .where(b.c.error.is_not(None))
            .group_by(b.c.run_id)
        ):
            retrying[run_id] = count
            errors.setdefault(run_id, error)
    if run_ids:
        b = batches_table
        for run_id, count in connection.execute(
            sa.select(b.c.run_id, sa.func.count())
            .where(b.c.run_id.in_(run_ids), b.c.state != BATCH_DONE, b.c.refusals > 0)
            .group_by(b.c.run_id)
        ):
            waiting[run_id] = count
    workers = alive_workers(connection) if run_ids else 0
    at = now()
    out = []
    for key in keys:
        row = recorded.get(key)
        if row is None:
            out.append(
                CounterStatus(
                    counter=key,
                    state=UNKNOWN,
                    hint="no backfill was requested or verified: run `alembic counterfill "
                    f"verify {key}` (or `enqueue {key}`); check that env.py enables the "
                    "alembic_counterfill autogenerate plugin in both configure() calls",
                )
            )
            continue
        st = CounterStatus(counter=key, state=row["state"])
        run = runs.get(row["run_id"]) if row["run_id"] is not None else None
        current = fingerprints.get(key) if fingerprints is not None else None
        run_fp = run_fingerprints(run).get(key) if run is not None else None
        # What the column is (being) filled with: the running backfill's
        # definition, else the recorded one.
        running = run is not None and run["state"] == RUN_RUNNING
        meant = run_fp if running and run_fp is not None else row["fingerprint"]
        if current is not None and meant is not None and meant != current:
            st.definition_changed = True
            st.hint = (
                "definition changed since last backfill: generate the migration "
                "(alembic revision --autogenerate) and upgrade, then run "
                f"`alembic counterfill enqueue {key}`"
            )
        if run is not None:
            _describe_run(st, run, at)
            st.last_error = errors.get(run["id"])
            st.retrying = retrying.get(run["id"], 0)
            st.workers_alive = workers
            if st.state in (BACKFILLING, PAUSED):
                st.activity = _activity(st, run, at)
            st.batches_waiting = waiting.get(run["id"], 0)
            if st.batches_waiting and st.hint is None:
                st.hint = (
                    f"{st.batches_waiting} batches refused by workers running another "
                    "definition of this run's counters: deploy the current models to the workers"
                )
        out.append(st)
    return out


def run_fingerprints(run: Any) -> dict[str, str]:
    """The ``{counter key: fingerprint}`` a run was planned under (empty if unrecorded)."""
    text = run["fingerprints"]
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def missing_columns(connection: Connection, counters: Sequence[Any]) -> list[str]:
    """Keys of ``counters`` whose column is not in the database (its migration has not run)."""
    inspector = sa.inspect(connection)
    wanted: dict[str | None, set[str]] = {}
    for counter in counters:
        wanted.setdefault(counter.parent_table.schema, set()).add(counter.parent_table.name)
    columns: dict[tuple[str | None, str], set[str]] = {}
    for schema, names in wanted.items():  # one reflection per schema, not two per table
        found = inspector.get_multi_columns(schema=schema, filter_names=sorted(names))
        for (_, name), described in found.items():
            columns[(schema, name)] = {c["name"] for c in described}
    return [
        c.key
        for c in counters
        if c.name not in columns.get((c.parent_table.schema, c.parent_table.name), set())
    ]


def record_active(
    connection: Connection, counters: Sequence[Any], parts: Mapping[str, Any]
) -> None:
    """Record verified-exact counters that had no record (or no definition) as ``active``.

    :param counters: counters found exact (or repaired) by ``verify``.
    :param parts: ``{key: (fingerprint, definition JSON)}`` of their current definitions.
    """
    ensure_tables(connection)
    c = counters_table
    recorded = counter_rows(connection)
    stamp = now()
    for counter in counters:
        fingerprint, text = parts[counter.key]
        row = recorded.get(counter.key)
        if row is None:
            table = counter.parent_table
            connection.execute(
                sa.insert(c).values(
                    key=counter.key,
                    table_name=table.name,
                    column_name=counter.name,
                    schema_name=table.schema,
                    state=ACTIVE,
                    updated_at=stamp,
                    activated_at=stamp,
                    fingerprint=fingerprint,
                    definition=text,
                )
            )
        elif row["state"] == ACTIVE and row["fingerprint"] is None:
            connection.execute(
                sa.update(c)
                .where(c.c.key == counter.key)
                .values(fingerprint=fingerprint, definition=text, updated_at=stamp)
            )


def _describe_run(st: CounterStatus, run: Any, at: dt.datetime) -> None:
    """Copy a run's figures into ``st``: batches, rows, size, rate, ETA, throttle."""
    st.batches_done = run["batches_done"]
    st.batches_total = run["batches_total"]
    st.batches_failed = run["batches_failed"]
    st.rows_changed = run["rows_changed"]
    st.batch_size = run["chunk_size"] or run["batch_size"]
    st.pinned = bool(run["pinned"])
    st.parents_done = run["parents_done"]
    st.parents_total = run["parents_total"]
    st.max_rows_per_second = run["max_rows_per_second"]
    if run["last_batch_at"] is not None:
        st.last_batch_seconds_ago = max(0.0, (at - _aware(run["last_batch_at"])).total_seconds())
    throttled_at = run["throttled_at"]
    if (
        throttled_at is not None
        and run["state"] == RUN_RUNNING
        and (at - _aware(throttled_at)).total_seconds() <= THROTTLE_SHOWN_SECONDS
    ):
        st.throttled = run["throttle_reason"]
    if run["state"] != RUN_RUNNING:
        return
    st.rate = _window_rate(run, at)
    if st.rate and st.parents_total is not None:
        left = max(0, st.parents_total - (st.parents_done or 0))
        st.eta_seconds = left / st.rate
    elif st.batches_done >= st.batches_total:
        st.eta_seconds = 0.0


def _activity(st: CounterStatus, run: Any, at: dt.datetime) -> str:
    """running, throttled, stalled or paused: is anything moving this backfill?

    Stalled: no live worker heartbeat and no batch committed for
    :data:`STALLED_SECONDS` (counted from the last batch, else from the
    resume or the planning).
    """
    if st.state == PAUSED or run["paused_at"] is not None:
        return "paused"
    if st.throttled:
        return "throttled"
    last = run["last_batch_at"] or run["resumed_at"] or run["created_at"]
    recent = (at - _aware(last)).total_seconds() < STALLED_SECONDS
    return "running" if recent or st.workers_alive else "stalled"
