"""Progress store: bookkeeping tables recording requests, runs and batches in the app's database.

Completion and recovery live here, not in the broker: a batch is done when its
row says so, and ``enqueue`` re-sends whatever is not.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: MetaData of the library's own tables; never part of the user's models.
bookkeeping = sa.MetaData()

#: Counter states, in lifecycle order.
PENDING, BACKFILLING, ACTIVE, FAILED = "pending", "backfilling", "active", "failed"

#: Run states: batches outstanding, all done, or all finished with some failed.
RUN_RUNNING, RUN_DONE, RUN_FAILED = "running", "done", "failed"

#: Batch states: planned, handed to the broker, applied, out of retries.
BATCH_PENDING, BATCH_SENT, BATCH_DONE, BATCH_FAILED = "pending", "sent", "done", "failed"

#: Older names of run and batch states (the library uses the prefixed ones above).
RUNNING, DONE, SENT = RUN_RUNNING, RUN_DONE, BATCH_SENT

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
)

TABLE_NAMES = frozenset(t.name for t in bookkeeping.tables.values())


def now() -> dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return dt.datetime.now(dt.timezone.utc)


def ensure_tables(connection: Connection) -> None:
    """Create the bookkeeping tables if they are missing."""
    bookkeeping.create_all(connection, checkfirst=True)


def has_tables(connection: Connection) -> bool:
    """Whether the bookkeeping tables exist (no request was ever recorded if not)."""
    return sa.inspect(connection).has_table(counters_table.name)


def request_statements(key: str, table: str, column: str, schema: str | None) -> list[Any]:
    """Statements recording ``key`` as pending (delete + insert: portable, renders offline)."""
    return [
        sa.delete(counters_table).where(counters_table.c.key == key),
        sa.insert(counters_table).values(
            key=key,
            table_name=table,
            column_name=column,
            schema_name=schema,
            state=PENDING,
            requested_at=now(),
            updated_at=now(),
        ),
    ]


def unrequest_statement(key: str) -> Any:
    """Statement removing the request (and any state) recorded for ``key``."""
    return sa.delete(counters_table).where(counters_table.c.key == key)


@dataclass
class CounterStatus:
    """What ``status`` shows for one declared counter."""

    counter: str
    state: str
    batches_done: int = 0
    batches_total: int = 0
    batches_failed: int = 0
    rows_changed: int = 0
    rate: float | None = None  # batches per second
    eta_seconds: float | None = None
    last_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON object ``status --json`` prints for this counter."""
        return dict(self.__dict__)


def counter_rows(connection: Connection) -> dict[str, Any]:
    """The recorded row of each counter that has one, by key (empty before any request)."""
    if not has_tables(connection):
        return {}
    rows = connection.execute(sa.select(counters_table)).mappings().all()
    return {r["key"]: r for r in rows}


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _rate(run: Any, since_resume: int) -> float | None:
    """Batches per second since the run started, or since it was last resumed."""
    end = _aware(run["finished_at"] or now())
    start, done = _aware(run["created_at"]), run["batches_done"]
    if run["resumed_at"] is not None:
        start, done = _aware(run["resumed_at"]), since_resume
    elapsed = (end - start).total_seconds()
    return done / elapsed if done and elapsed > 0 else None


def statuses(connection: Connection, keys: list[str]) -> list[CounterStatus]:
    """Status of each declared counter key, in the given order.

    A counter with no recorded row was never requested: it is ``active``
    (maintained live since it was declared, e.g. created with its table).
    """
    recorded = counter_rows(connection)
    run_ids = {r["run_id"] for r in recorded.values() if r["run_id"] is not None}
    runs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    since_resume: dict[int, int] = {}
    if run_ids:
        for run_row in connection.execute(
            sa.select(runs_table).where(runs_table.c.id.in_(run_ids))
        ).mappings():
            runs[run_row["id"]] = run_row
        failed = connection.execute(
            sa.select(batches_table.c.run_id, batches_table.c.error)
            .where(batches_table.c.run_id.in_(run_ids), batches_table.c.state == BATCH_FAILED)
            .order_by(batches_table.c.finished_at)
        )
        for run_id, error in failed:
            errors[run_id] = error
        # A resumed run's rate counts only batches since the resume: the pause
        # before it must not make the backfill look slow.
        b, rt = batches_table, runs_table
        for run_id, count in connection.execute(
            sa.select(b.c.run_id, sa.func.count())
            .join(rt, rt.c.id == b.c.run_id)
            .where(
                b.c.run_id.in_(run_ids),
                b.c.state == BATCH_DONE,
                rt.c.resumed_at.is_not(None),
                b.c.finished_at >= rt.c.resumed_at,
            )
            .group_by(b.c.run_id)
        ):
            since_resume[run_id] = count
    out = []
    for key in keys:
        row = recorded.get(key)
        if row is None:
            out.append(CounterStatus(counter=key, state=ACTIVE))
            continue
        st = CounterStatus(counter=key, state=row["state"])
        run = runs.get(row["run_id"]) if row["run_id"] is not None else None
        if run is not None:
            st.batches_done = run["batches_done"]
            st.batches_total = run["batches_total"]
            st.batches_failed = run["batches_failed"]
            st.rows_changed = run["rows_changed"]
            st.last_error = errors.get(run["id"])
            st.rate = _rate(run, since_resume.get(run["id"], 0))
            remaining = st.batches_total - st.batches_done - st.batches_failed
            if st.rate:
                st.eta_seconds = remaining / st.rate if remaining > 0 else 0.0
        out.append(st)
    return out
