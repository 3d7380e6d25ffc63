"""Pause and resume backfills: state changes in the bookkeeping tables that workers obey.

Pausing a counter pauses its run, so every counter recounted in the same pass
over the parent table pauses with it (one run per parent table). Workers that
pick up a paused run's batch leave it queued for later; resuming lets them
continue from each batch's saved cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import progress as p


@dataclass
class Change:
    """What a pause or resume did."""

    changed: list[str] = field(default_factory=list)  # counter keys now paused / resumed
    unchanged: dict[str, str] = field(default_factory=dict)  # key -> its state, left alone
    run_ids: list[int] = field(default_factory=list)


def pause(connection: Connection, keys: Sequence[str]) -> Change:
    """Pause the backfills of ``keys`` (and their runs' other counters); active ones stay so."""
    p.ensure_tables(connection)
    c, r = p.counters_table, p.runs_table
    recorded = p.counter_rows(connection)
    out = Change()
    run_ids = {
        recorded[k]["run_id"]
        for k in keys
        if k in recorded and recorded[k]["state"] == p.BACKFILLING and recorded[k]["run_id"]
    }
    now = p.now()
    if run_ids:
        connection.execute(
            sa.update(r)
            .where(r.c.id.in_(run_ids), r.c.state == p.RUN_RUNNING)
            .values(paused_at=now)
        )
        connection.execute(
            sa.update(c)
            .where(c.c.run_id.in_(run_ids), c.c.state == p.BACKFILLING)
            .values(state=p.PAUSED, updated_at=now)
        )
    # A pending counter with no run yet: its next run starts paused.
    pending = [k for k in keys if k in recorded and recorded[k]["state"] == p.PENDING]
    if pending:
        connection.execute(
            sa.update(c).where(c.c.key.in_(pending)).values(state=p.PAUSED, updated_at=now)
        )
    after = p.counter_rows(connection)
    for key in keys:
        state = after[key]["state"] if key in after else p.ACTIVE
        if state == p.PAUSED and (key not in recorded or recorded[key]["state"] != p.PAUSED):
            out.changed.append(key)
        else:
            out.unchanged[key] = state
    out.run_ids = sorted(run_ids)
    return out


def resume(connection: Connection, keys: Sequence[str]) -> Change:
    """Resume the paused backfills of ``keys`` (and of their runs' other counters)."""
    p.ensure_tables(connection)
    c, r = p.counters_table, p.runs_table
    recorded = p.counter_rows(connection)
    out = Change()
    paused = [k for k in keys if k in recorded and recorded[k]["state"] == p.PAUSED]
    run_ids = {recorded[k]["run_id"] for k in paused if recorded[k]["run_id"] is not None}
    now = p.now()
    if run_ids:
        connection.execute(sa.update(r).where(r.c.id.in_(run_ids)).values(paused_at=None))
        running = set(
            connection.execute(
                sa.select(r.c.id).where(r.c.id.in_(run_ids), r.c.state == p.RUN_RUNNING)
            ).scalars()
        )
        if running:
            connection.execute(
                sa.update(c)
                .where(c.c.run_id.in_(running), c.c.state == p.PAUSED)
                .values(state=p.BACKFILLING, updated_at=now)
            )
    # Paused before any run (or its run ended meanwhile): pending again.
    connection.execute(
        sa.update(c)
        .where(c.c.key.in_(paused), c.c.state == p.PAUSED)
        .values(state=p.PENDING, updated_at=now)
    )
    for key in keys:
        if key in paused:
            out.changed.append(key)
        else:
            out.unchanged[key] = recorded[key]["state"] if key in recorded else p.ACTIVE
    out.run_ids = sorted(run_ids)
    return out


def paused_runs(connection: Connection, run_ids: Sequence[int]) -> list[int]:
    """Which of ``run_ids`` are paused."""
    r = p.runs_table
    return list(
        connection.execute(
            sa.select(r.c.id).where(r.c.id.in_(list(run_ids)), r.c.paused_at.is_not(None))
        ).scalars()
    )
