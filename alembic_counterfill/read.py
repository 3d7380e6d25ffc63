"""Read counters safely during rollout: the cached column once trusted, the live COUNT/SUM before.

With this helper the code that reads a new counter ships in the same deploy
as the migration adding it::

    from alembic_counterfill import counter_value

    followers = counter_value(session, user, "followers_count")

Until the counter's first backfill completes (``unknown``, ``pending``,
``backfilling``, ``failed``) the value is computed from the child table; from
then on it is the cached column. A counter whose definition changed is
``pending`` again and read live until its new backfill completes (also when
the recorded definition differs from the running code's). A recount of a
counter that was already active (``enqueue --all``) keeps reading the
cache, which live maintenance keeps exact throughout. The state is looked up
at most every few seconds per database and counter.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ColumnProperty, Mapper, Session

from . import buffer, definition, sql
from . import progress as p
from .counters import Counter
from .declaration import spec_of
from .errors import UnknownCounterError

#: Seconds a looked-up state is reused.
CACHE_SECONDS = 5.0

_cache: dict[tuple[str, str], tuple[float, bool]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every looked-up state (tests, or right after a backfill in the same process)."""
    with _cache_lock:
        _cache.clear()


def counter_of(mapper: Mapper[Any], attr: str) -> Counter:
    """The counter behind mapped attribute ``attr``; :class:`UnknownCounterError` if none."""
    prop = mapper.attrs.get(attr)
    column = prop.columns[0] if isinstance(prop, ColumnProperty) and prop.columns else None
    spec = spec_of(column) if isinstance(column, sa.Column) else None
    if spec is None or spec.resolved is None:
        raise UnknownCounterError(
            f"{mapper.class_.__name__}.{attr} is not a counter_cache() column; "
            "pass the attribute name of a declared counter"
        )
    return spec.resolved


def _lookup(conn: Connection, counter: Counter) -> bool:
    # No record means unknown: the column may never have been filled (e.g. the
    # autogenerate plugin was not enabled), so count live until verify or a
    # backfill records the counter. A recorded definition other than this
    # code's means the column follows another meaning: count live too.
    inspector = sa.inspect(conn)
    c = p.counters_table
    if not inspector.has_table(c.name):
        return False
    # Tables of an older release have no fingerprint yet (the next command
    # adds it): the application reads them as they are, never altering them.
    present = {col["name"] for col in inspector.get_columns(c.name)}
    fingerprint = c.c.fingerprint if "fingerprint" in present else sa.null()
    row = conn.execute(
        sa.select(c.c.state, c.c.activated_at, fingerprint.label("fingerprint")).where(
            c.c.key == counter.key
        )
    ).first()
    if row is None:
        return False
    if row.fingerprint is not None and row.fingerprint != definition.fingerprint(counter):
        return False
    return row.state == p.ACTIVE or row.activated_at is not None


def is_trusted(session: Session, counter: Counter) -> bool:
    """Whether ``counter``'s cached column can be read (active, or active before a recount)."""
    bind = session.get_bind(mapper=counter.parent_mapper)
    cache_key = (str(bind.engine.url), counter.key)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(cache_key)
    if hit is not None and hit[0] > now:
        return hit[1]
    if isinstance(bind, sa.Engine):
        # A connection of its own: a lookup must never disturb the session's transaction.
        with bind.connect() as conn:
            trusted = _lookup(conn, counter)
    else:
        trusted = _lookup(bind, counter)
    with _cache_lock:
        _cache[cache_key] = (now + CACHE_SECONDS, trusted)
    return trusted


def counter_value(session: Session, obj: Any, attr: str) -> Any:
    """The value of counter ``attr`` on ``obj``: cached when trusted, else counted live.

    A buffered (hot-parent) counter's cached value is its column plus its
    pending deltas, read in one statement, so it is exact between folds.

    :param session: the session ``obj`` belongs to (used for the live count,
        so unflushed changes are flushed and counted).
    :param obj: a persistent instance of the parent model.
    :param attr: the counter's attribute name, e.g. ``"followers_count"``.
    """
    state = sa.inspect(obj)
    counter = counter_of(state.mapper, attr)
    ident = state.mapper.primary_key_from_instance(obj)[0]
    if is_trusted(session, counter):
        if buffer.is_buffered(counter):
            # Column + pending deltas in one statement: exact, whatever the fold lag.
            return session.execute(sql.exact_value(counter, ident)).scalar_one()
        return getattr(obj, attr)
    return session.execute(sql.live_value(counter, ident)).scalar_one()
