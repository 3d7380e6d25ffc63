"""Which unfinished batches ``enqueue`` sends again, when the broker cannot list its messages.

Redis shows the batch ids waiting in a queue, so ``enqueue`` skips those.
RabbitMQ cannot list queued messages; there the bookkeeping decides. Every
message published for a batch (by ``enqueue``, or by a worker deferring a
paused or throttled batch) stamps its ``sent_at`` and counts in ``sends``;
every transaction a worker starts on it stamps ``started_at``. A batch is
sent again when

1. it was never sent, or it failed;
2. its last message is stale: published more than ``resend_after_seconds``
   ago and not picked up since (no transaction started after it); or
3. no worker is alive on the queue and the queue holds no ready message: its
   message is gone (the queue was purged or deleted).

Anything else is taken to be still queued or in a worker's hands (RabbitMQ
returns the unacknowledged messages of a worker that dies to the queue).
A duplicate message is harmless (its batch is done once), only wasted work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import progress as p

#: Default age (seconds) after which a sent, never-picked-up batch's message counts as lost.
RESEND_AFTER_SECONDS = 300.0


def to_send(
    connection: Connection,
    batch_ids: Sequence[int],
    resend_after_seconds: float,
    *,
    queue_drained: bool,
) -> list[int]:
    """The batches among ``batch_ids`` to send again under the rule of this module.

    :param queue_drained: the queue holds no ready message and no worker is alive on it.
    """
    b = p.batches_table
    cutoff = p.now() - dt.timedelta(seconds=resend_after_seconds)
    chosen: list[int] = []
    for start in range(0, len(batch_ids), 5000):
        chunk = list(batch_ids[start : start + 5000])
        rows = connection.execute(
            sa.select(b.c.id, b.c.state, b.c.sent_at, b.c.started_at).where(b.c.id.in_(chunk))
        ).all()
        for row in rows:
            if row.state == p.BATCH_DONE:
                continue
            sent = _aware(row.sent_at)
            started = _aware(row.started_at)
            never_sent = row.state == p.BATCH_PENDING or sent is None
            picked_up = started is not None and sent is not None and started >= sent
            stale = sent is not None and sent < cutoff and not picked_up
            if never_sent or row.state == p.BATCH_FAILED or queue_drained or stale:
                chosen.append(row.id)
    return sorted(chosen)


def note_sent(connection: Connection, batch_ids: Sequence[int]) -> None:
    """Record one more message published for each batch (done ones are left alone)."""
    b = p.batches_table
    now = p.now()
    for start in range(0, len(batch_ids), 5000):
        chunk = list(batch_ids[start : start + 5000])
        connection.execute(
            sa.update(b)
            .where(b.c.id.in_(chunk), b.c.state != p.BATCH_DONE)
            .values(
                state=sa.case((b.c.state == p.BATCH_PENDING, p.BATCH_SENT), else_=b.c.state),
                sent_at=now,
                sends=b.c.sends + 1,
            )
        )


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; they were written in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)
