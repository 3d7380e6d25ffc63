"""The statements of a backfill piece, built once and run again with bound parameters.

A batch runs in pieces of ~1,000-2,000 parents (:mod:`.batch`), each the same
few statements with other bounds. Building them anew per piece cost several
milliseconds of Python (the recount's joins and subqueries, then SQLAlchemy's
cache key of the whole construct), as much as a small piece's server time.
Each function here builds its statement once per shape (counters, which
bounds are open, dialect) with :func:`sqlalchemy.bindparam` for what changes
per piece; the construct's cache key is memoised, so executing it again finds
the compiled form at once. The statements are those :mod:`.sql` and
:mod:`.batch` built before: the batch protocol does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from . import progress as p
from . import signals, sql
from .counters import Counter

T = TypeVar("T")

#: Parameter names of the piece's bounds (``lo <= key < hi``). No parameter is
#: named like a column of the tables updated: SQLAlchemy reserves those names
#: for the SET clause.
LO, HI = "counterfill_lo", "counterfill_hi"

#: Shapes kept (tests build many metadata sets; a batch worker uses a handful).
_LIMIT = 256
_built: dict[Hashable, Any] = {}


def _once(key: Hashable, build: Callable[[], T]) -> T:
    """The statement built for ``key``, building it on first use."""
    found = _built.get(key)
    if found is None:
        if len(_built) >= _LIMIT:
            _built.clear()
        found = _built[key] = build()
    return found


def bounds(pk: sa.Column[Any], lo: Any, hi: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Bound parameters standing for ``lo`` and ``hi`` (None stays None: an open end)."""
    params: dict[str, Any] = {}
    lo_p = hi_p = None
    if lo is not None:
        lo_p, params[LO] = sa.bindparam(LO, type_=pk.type), lo
    if hi is not None:
        hi_p, params[HI] = sa.bindparam(HI, type_=pk.type), hi
    return lo_p, hi_p, params


def recount(
    counters: Sequence[Counter], lo: Any, hi: Any, dialect: str
) -> tuple[list[Any], dict[str, Any]]:
    """:func:`.sql.recount_statements` over ``[lo, hi)``, and the parameters to run them with."""
    pk = counters[0].parent_pk
    lo_p, hi_p, params = bounds(pk, lo, hi)
    key = ("recount", tuple(counters), lo is None, hi is None, dialect)
    stmts = _once(key, lambda: sql.recount_statements(counters, lo_p, hi_p, dialect=dialect))
    return stmts, params


def lock_next_parents(
    table: sa.Table, pk: sa.Column[Any], start: Any, hi: Any, size: int
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """:func:`.sql.lock_next_parents`, with the piece's bounds and size as parameters."""
    lo_p, hi_p, params = bounds(pk, start, hi)
    params["counterfill_limit"] = size  # the statement locks one more
    key = ("lock_next", table, pk, start is None, hi is None)
    stmt = _once(
        key,
        lambda: sql.lock_next_parents(
            table, pk, lo_p, hi_p, sa.bindparam("counterfill_limit", type_=sa.Integer)
        ),
    )
    return stmt, params


def lock_parents(
    table: sa.Table, pk: sa.Column[Any], lo: Any, hi: Any
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """:func:`.sql.lock_parents` of ``[lo, hi)``, with the bounds as parameters."""
    lo_p, hi_p, params = bounds(pk, lo, hi)
    key = ("lock", table, pk, lo is None, hi is None)
    return _once(key, lambda: sql.lock_parents(table, pk, lo_p, hi_p)), params


def lock_batch(dialect: str, settings: Sequence[str], *, returning: bool) -> sa.Update:
    """Lock a batch row (``batch_id``), bumping its attempts by ``bump``; see ``batch._lock_batch``.

    On PostgreSQL it returns the run's settings too, and applies the
    transaction's ``settings`` (names fixed here, values ``setting_<i>``);
    elsewhere it returns the batch's own columns when ``returning``.
    """

    def build() -> sa.Update:
        b, r = p.batches_table, p.runs_table
        touch = {
            "attempts": b.c.attempts + sa.bindparam("bump", type_=sa.Integer),
            "started_at": sa.bindparam("started", type_=b.c.started_at.type),
        }
        stmt = sa.update(b).values(touch)
        mine = (b.c.state, b.c.run_id, b.c.lo, b.c.hi, b.c.cursor)
        if dialect != "postgresql":
            stmt = stmt.where(b.c.id == sa.bindparam("batch_id", type_=b.c.id.type))
            return stmt.returning(*mine) if returning else stmt
        return stmt.where(
            b.c.id == sa.bindparam("batch_id", type_=b.c.id.type), r.c.id == b.c.run_id
        ).returning(
            *mine,
            *[r.c[name] for name in RUN_SETTINGS],
            r.c.state.label("run_state"),
            *[
                sa.func.set_config(name, sa.bindparam(f"setting_{i}", type_=sa.Text), True).label(
                    f"setting_{i}"
                )
                for i, name in enumerate(settings)
            ],
        )

    return _once(("lock_batch", dialect, tuple(settings), returning), build)


#: The run's columns a piece reads with its batch row.
RUN_SETTINGS = (
    "counter_keys",
    "batch_size",
    "chunk_size",
    "pinned",
    "paused_at",
    "fingerprints",
)


def move_batch(last: bool) -> sa.Update:
    """Move batch ``batch_id``'s cursor to ``new_cursor`` (``last``: mark it done at ``now``).

    It also adds ``n`` rows changed to the batch row.

    ``n`` is bound by the caller: a number, or on PostgreSQL the recount's
    row count (see :func:`merged_read`).
    """

    def build() -> sa.Update:
        return _moved(last, sa.bindparam("n", type_=sa.Integer))

    return _once(("move", last), build)


def _moved(last: bool, n: Any) -> sa.Update:
    b = p.batches_table
    stmt = sa.update(b).where(b.c.id == sa.bindparam("batch_id", type_=b.c.id.type))
    if last:
        return stmt.values(
            state=p.BATCH_DONE,
            finished_at=sa.bindparam("now", type_=b.c.finished_at.type),
            rows_changed=b.c.rows_changed + n,
            error=None,
            cursor=None,
        )
    return stmt.values(
        cursor=sa.bindparam("new_cursor", type_=b.c.cursor.type), rows_changed=b.c.rows_changed + n
    )


def read_run(
    counters: Sequence[Counter] | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
    last: bool = False,
    ask: bool = False,
) -> sa.Select[Any]:
    """Lock (``FOR NO KEY UPDATE``) and read the run row ``the_run``.

    With ``counters`` (PostgreSQL), the piece's recount over ``[lo, hi)``
    (``open_lo``/``open_hi``: that bound is None) and the batch row's move
    travel in the same statement as data-modifying CTEs, returning the rows
    changed as ``counterfill_changed`` and, with ``ask``, the sessions
    waiting on the transaction's locks as ``counterfill_waiters``.
    """

    def build() -> sa.Select[Any]:
        r = p.runs_table
        read = (
            sa.select(r)
            .where(r.c.id == sa.bindparam("the_run", type_=r.c.id.type))
            .with_for_update(key_share=True)
        )
        if counters is None:
            return read
        pk = counters[0].parent_pk
        lo_p = None if open_lo else sa.bindparam(LO, type_=pk.type)
        hi_p = None if open_hi else sa.bindparam(HI, type_=pk.type)
        (stmt,) = sql.recount_statements(counters, lo_p, hi_p, dialect="postgresql")
        recount = stmt.returning(sa.literal(1).label("one")).cte("recount")
        n = sa.select(sa.func.count()).select_from(recount).scalar_subquery()
        moved = _moved(last, n).cte("moved")
        # The rows changed come before the waiters' count in the select
        # list: PostgreSQL evaluates it, and so runs the recount, first, and
        # counts the sessions that waited during the recount too.
        read = read.add_cte(recount).add_cte(moved)
        read = read.add_columns(n.label("counterfill_changed"))
        if ask:
            read = read.add_columns(signals.waiters_count().label("counterfill_waiters"))
        return read

    key = ("read_run", tuple(counters) if counters else None, open_lo, open_hi, last, ask)
    return _once(key, build)


#: Run columns a piece adds to (``column + <parameter>``) rather than sets.
_ADDED = {
    "rows_changed": "d_changed",
    "parents_done": "d_parents",
}


def update_run(keys: Sequence[str], *, last: bool, was_failed: bool, returning: bool) -> sa.Update:
    """Add a piece's figures to the run row ``the_run``; set the other ``keys`` to ``v_<key>``.

    ``d_changed`` and ``d_parents`` are added to ``rows_changed`` and
    ``parents_done``; ``last`` counts a batch done (``was_failed``: one failed
    fewer). With ``returning``, it returns the batch counts.
    """

    def build() -> sa.Update:
        r = p.runs_table
        values: dict[str, Any] = {
            "rows_changed": r.c.rows_changed + sa.bindparam("d_changed", type_=sa.Integer),
            "parents_done": sa.func.coalesce(r.c.parents_done, 0)
            + sa.bindparam("d_parents", type_=sa.Integer),
        }
        if last:
            values["batches_done"] = r.c.batches_done + 1
            if was_failed:
                values["batches_failed"] = r.c.batches_failed - 1
        for k in keys:
            values[k] = sa.bindparam(f"v_{k}", type_=r.c[k].type)
        stmt = sa.update(r).where(r.c.id == sa.bindparam("the_run", type_=r.c.id.type))
        stmt = stmt.values(values)
        if returning:
            stmt = stmt.returning(r.c.batches_done, r.c.batches_failed, r.c.batches_total)
        return stmt

    return _once(("update_run", tuple(keys), last, was_failed, returning), build)


def run_counts() -> sa.Select[Any]:
    """Read the batch counts of run ``the_run`` (databases without ``UPDATE … RETURNING``)."""
    r = p.runs_table
    return _once(
        ("run_counts",),
        lambda: sa.select(r.c.batches_done, r.c.batches_failed, r.c.batches_total).where(
            r.c.id == sa.bindparam("the_run", type_=r.c.id.type)
        ),
    )
