"""Follow runs until they end: a progress bar with rate and ETA, then a summary (``--wait``).

Progress is read from the bookkeeping tables, so it is the same whether the
batches run in Dramatiq workers on other machines or in this process.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import progress as p
from .planning import range_text


@dataclass
class RunsProgress:
    """Figures of a set of runs, added up."""

    batches_total: int = 0
    batches_done: int = 0
    batches_failed: int = 0
    rows_changed: int = 0
    finished: bool = True  # every run is done or failed
    tables: list[str] = field(default_factory=list)
    parents_done: int = 0  # parents recounted so far (pieces of batches included)
    retrying: int = 0  # batches whose last attempt failed, to be retried
    last_error: str | None = None  # of a retrying or failed batch
    paused: bool = False  # some unfinished run is paused
    throttled: str | None = None  # why batches backed off lately

    @property
    def remaining(self) -> int:
        """Batches neither done nor failed."""
        return self.batches_total - self.batches_done - self.batches_failed


def read_progress(conn: Connection, run_ids: Sequence[int]) -> RunsProgress:
    """Add up the figures of ``run_ids``."""
    out = RunsProgress()
    r, b = p.runs_table, p.batches_table
    recent = p.now() - dt.timedelta(seconds=p.THROTTLE_SHOWN_SECONDS)
    for run in conn.execute(sa.select(r).where(r.c.id.in_(list(run_ids)))).mappings():
        out.batches_total += run["batches_total"]
        out.batches_done += run["batches_done"]
        out.batches_failed += run["batches_failed"]
        out.rows_changed += run["rows_changed"]
        out.parents_done += run["parents_done"] or 0
        running = run["state"] == p.RUN_RUNNING
        out.finished = out.finished and not running
        out.paused = out.paused or (running and run["paused_at"] is not None)
        throttled_at = run["throttled_at"]
        if running and throttled_at is not None and _aware(throttled_at) >= recent:
            out.throttled = run["throttle_reason"]
        if run["table_name"] not in out.tables:
            out.tables.append(run["table_name"])
    retry = conn.execute(
        sa.select(sa.func.count(), sa.func.max(b.c.error)).where(
            b.c.run_id.in_(list(run_ids)),
            b.c.state.in_([p.BATCH_PENDING, p.BATCH_SENT]),
            b.c.error.is_not(None),
        )
    ).one()
    out.retrying, out.last_error = retry[0], retry[1]
    if out.batches_failed and out.last_error is None:
        failed = failed_batches(conn, run_ids, limit=1)
        out.last_error = failed[0].error if failed else None
    return out


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def failed_batches(conn: Connection, run_ids: Sequence[int], limit: int = 5) -> list[Any]:
    """Up to ``limit`` failed batches of ``run_ids`` (id, key bounds, error), oldest first."""
    b = p.batches_table
    return list(
        conn.execute(
            sa.select(b.c.id, b.c.lo, b.c.hi, b.c.error)
            .where(b.c.run_id.in_(list(run_ids)), b.c.state == p.BATCH_FAILED)
            .order_by(b.c.finished_at, b.c.id)
            .limit(limit)
        )
    )


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Bar:
    """A one-line progress bar with rate and ETA; plain periodic lines when not on a terminal."""

    width = 30

    def __init__(self, stream: TextIO, label: str, tty: bool | None = None) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.last_line = 0.0
        self.last_text = ""

    def render(self, pr: RunsProgress) -> str:
        """The bar's text for ``pr``."""
        total = max(pr.batches_total, 1)
        finished = pr.batches_done + pr.batches_failed
        filled = int(self.width * finished / total)
        if self.first_done is None:
            self.first_done = pr.batches_done
        elapsed = time.monotonic() - self.started
        rate = (pr.batches_done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = _clock(pr.remaining / rate) if rate > 0 else "--:--"
        text = (
            f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] "
            f"{finished}/{pr.batches_total} batches  {rate:.1f}/s  ETA {eta}  "
            f"{pr.rows_changed:,} rows changed"
        )
        if pr.batches_failed:
            text += f"  {pr.batches_failed} failed"
        if pr.retrying:
            text += f"  {pr.retrying} retrying"
        if pr.throttled:
            text += f"  throttled: {pr.throttled}"
        if pr.paused:
            text += "  PAUSED"
        if (pr.retrying or pr.batches_failed) and pr.last_error:
            text += f"  last error: {' '.join(pr.last_error.split())[:80]}"
        return text

    def update(self, pr: RunsProgress) -> None:
        """Redraw (terminal) or print a line every few seconds (logs, CI)."""
        text = self.render(pr)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self.last_text)))
            self.stream.flush()
        elif now - self.last_line >= 5 or (pr.finished and text != self.last_text):
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_line = now
        self.last_text = text

    def close(self) -> None:
        """End the bar's line."""
        if self.tty and self.last_text:
            self.stream.write("\n")
            self.stream.flush()


def wait(
    engine: sa.Engine,
    run_ids: Sequence[int],
    *,
    stream: TextIO,
    interval: float = 0.1,
    hint_after: float = 20.0,
    label: str = "backfill",
    sleep: Callable[[float], object] = time.sleep,
) -> RunsProgress:
    """Draw progress until every run in ``run_ids`` is done, failed or paused; return the figures.

    :param hint_after: seconds without any batch finishing before a hint that
        workers may not be running is printed (once).
    :param sleep: waits between two reads of the progress (e.g.
        :meth:`.notify.Listener.wait`, which returns early when a run ends).
    """
    bar = Bar(stream, label)
    last_change, last_finished, hinted = time.monotonic(), (-1, -1), False
    try:
        while True:
            with engine.connect() as conn:
                pr = read_progress(conn, run_ids)
            bar.update(pr)
            if pr.finished or pr.paused:
                return pr
            # Progress is any piece committed, not only whole batches: an
            # adaptive batch of a big range takes many transactions.
            finished = (pr.batches_done + pr.batches_failed, pr.parents_done)
            if finished != last_finished:
                last_change, last_finished = time.monotonic(), finished
            elif not hinted and time.monotonic() - last_change > hint_after:
                hinted = True
                bar.close()
                stream.write(
                    f"no batch finished for {hint_after:.0f}s: are workers running? "
                    "(dramatiq alembic_counterfill.worker)\n"
                )
            sleep(interval)
    finally:
        bar.close()


def summary(conn: Connection, run_ids: Sequence[int], seconds: float) -> list[str]:
    """Lines describing how the runs ended: batches, rows changed, time, failures."""
    pr = read_progress(conn, run_ids)
    lines = [
        f"{', '.join(pr.tables) or 'nothing'}: {pr.batches_done}/{pr.batches_total} batches done, "
        f"{pr.rows_changed:,} rows changed in {seconds:.1f}s, {pr.batches_failed} failed"
    ]
    for row in failed_batches(conn, run_ids):
        lines.append(f"  batch {row.id} {range_text(row.lo, row.hi)} failed: {row.error}")
    return lines
