"""SQL builders: the only place that writes counting SQL (live deltas, recounts, truth).

Statements are built here and executed by their callers: nothing in this
module touches a connection. Everything is built from SQLAlchemy constructs
with bound parameters, so identifiers never reach SQL as text.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import buffer, innodb, innodb_access
from .arrays import array_bind, array_param, array_value

if TYPE_CHECKING:
    from .counters import Counter


def may_skip_or_update(insert: Any) -> bool:
    """Whether ``insert`` may write fewer rows than it lists, or update existing ones.

    Upserts (``ON CONFLICT``, ``ON DUPLICATE KEY UPDATE``) and ``INSERT
    IGNORE`` (SQLite's ``INSERT OR IGNORE``), which skips colliding rows like
    ``ON CONFLICT DO NOTHING``: what such a statement counts is known only by
    recounting, not from its parameters.
    """
    ignore = any("IGNORE" in str(prefix).upper() for prefix, _ in insert._prefixes)
    return ignore or getattr(insert, "_post_values_clause", None) is not None


def contribution(counter: Counter) -> sa.ColumnElement[Any]:
    """What one child row adds to its parent's counter (1/0 for counts, the value for sums)."""
    value: sa.ColumnElement[Any] = (
        sa.func.coalesce(counter.summed_value, 0) if counter.summed is not None else sa.literal(1)
    )
    if counter.where is not None:
        value = sa.case((counter.where, value), else_=0)
    return value


def key_range(column: sa.ColumnElement[Any], lo: Any, hi: Any) -> sa.ColumnElement[bool]:
    """``lo <= column < hi``; a ``None`` bound is open."""
    cond: sa.ColumnElement[bool] = sa.true()
    if lo is not None:
        cond = sa.and_(cond, column >= lo)
    if hi is not None:
        cond = sa.and_(cond, column < hi)
    return cond


def _scope(
    column: sa.ColumnElement[Any], lo: Any, hi: Any, ids: Sequence[Any] | None, dialect: str = ""
) -> sa.ColumnElement[bool]:
    """``[lo, hi)``, narrowed to ``ids`` when given (verify re-checks single candidates)."""
    cond = key_range(column, lo, hi)
    if ids is not None:
        if dialect == "postgresql" and isinstance(column, sa.Column):
            cond = sa.and_(cond, keys_in([column], [(x,) for x in ids], dialect))
        else:
            cond = sa.and_(cond, column.in_(list(ids)))
    return cond


def lock_parents(
    table: sa.Table,
    pk: sa.Column[Any],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
    dialect: str = "",
) -> sa.Select[Any]:
    """Lock the parent rows of ``[lo, hi)`` (or of ``ids``) in key order.

    ``FOR NO KEY UPDATE`` on PostgreSQL: it waits for writers that already
    applied a delta to these parents, yet does not block child inserts whose
    foreign-key checks take ``KEY SHARE`` locks. The statement returns the
    number of rows locked. With ``dialect="postgresql"``, ``ids`` travel as one
    array parameter (any number of parents in one statement).
    """
    inner = (
        sa.select(pk)
        .where(_scope(pk, lo, hi, ids, dialect))
        .order_by(pk)
        .with_for_update(key_share=True)
        .subquery("locked")
    )
    return sa.select(sa.func.count()).select_from(inner)


def lock_next_parents(
    table: sa.Table, pk: sa.Column[Any], start: Any, hi: Any, size: int | sa.ColumnElement[int]
) -> sa.Select[Any]:
    """Lock the first ``size + 1`` parents of ``[start, hi)`` in key order; one row back.

    PostgreSQL's piece of an adaptive batch in one round trip instead of two
    (find the piece's end, then lock it): the row returned is the last one
    locked, with the number locked. When ``size + 1`` were locked, that last
    key is where the piece ends (exclusive: its row stays locked, uncounted,
    until the commit); fewer mean the piece reaches ``hi``.
    """
    locked = (
        sa.select(pk.label("k"))
        .where(key_range(pk, start, hi))
        .order_by(pk)
        .limit(size + 1)
        .with_for_update(key_share=True)
        .subquery("locked")
    )
    return (
        sa.select(locked.c.k, sa.func.count().over().label("n"))
        .order_by(locked.c.k.desc())
        .limit(1)
    )


def truth_columns(
    counters: Sequence[Counter],
    parent: sa.FromClause,
    pk: sa.ColumnElement[Any],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
) -> tuple[sa.FromClause, list[sa.ColumnElement[Any]]]:
    """Join ``parent`` to grouped child aggregates and return the true value of each counter.

    Counters that share a child table and FK share one grouped scan of the
    child's FK index range (``[lo, hi)``, narrowed to ``ids`` when given).
    """
    groups: dict[tuple[sa.Table, sa.Column[Any]], list[int]] = {}
    for i, counter in enumerate(counters):
        groups.setdefault((counter.child_table, counter.fk), []).append(i)
    truths: list[sa.ColumnElement[Any] | None] = [None] * len(counters)
    joined: sa.FromClause = parent
    for g, ((_, fk), members) in enumerate(groups.items()):
        aggs = []
        for i in members:
            c = counters[i]
            plain = c.summed is None and c.where is None
            agg = sa.func.count() if plain else sa.func.sum(contribution(c))
            aggs.append(agg.label(f"n{i}"))
        sub = (
            sa.select(fk.label("k"), *aggs)
            .where(fk.is_not(None), _scope(fk, lo, hi, ids))
            .group_by(fk)
            .subquery(f"g{g}")
        )
        joined = joined.outerjoin(sub, sub.c.k == pk)
        for i in members:
            truths[i] = sa.func.coalesce(sub.c[f"n{i}"], 0)
    return joined, [t for t in truths if t is not None]


def recount_range(
    counters: Sequence[Counter],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
) -> sa.Update:
    """One UPDATE setting every counter of one parent table to its truth over ``[lo, hi)``.

    All counters of the table are written in one pass (one row version per
    parent, not one per counter), and only rows whose value differs are
    written; the rowcount is rows changed. ``ids`` narrows the range to
    those parents (verify's repairs). MariaDB/MySQL use :func:`drift_rows`
    and :func:`.innodb.write_truths` instead.
    """
    table, pk = counters[0].parent_table, counters[0].parent_pk
    parent = table.alias("p")
    p_pk = parent.c[pk.key]
    joined, truths = truth_columns(counters, parent, p_pk, lo, hi, ids=ids)
    truth = (
        sa.select(p_pk.label("pk"), *[t.label(f"t{i}") for i, t in enumerate(truths)])
        .select_from(joined)
        .where(_scope(p_pk, lo, hi, ids))
        .subquery("truth")
    )
    differs = sa.or_(*[c.column.is_distinct_from(truth.c[f"t{i}"]) for i, c in enumerate(counters)])
    return (
        sa.update(table)
        .values({c.column.name: truth.c[f"t{i}"] for i, c in enumerate(counters)})
        # The range on the target too: without it PostgreSQL may hash-join the
        # whole table (a sequential scan per batch) instead of an index range.
        .where(pk == truth.c.pk, _scope(pk, lo, hi, ids), differs)
    )


def drift_rows(
    counters: Sequence[Counter], lo: Any, hi: Any, *, ids: Sequence[Any] | None = None
) -> sa.Select[Any]:
    """Select ``pk, cached<i>, actual<i>`` for parents in ``[lo, hi)`` whose counters are wrong.

    ``ids`` narrows the range to those parents (verify's re-check).
    """
    table, pk = counters[0].parent_table, counters[0].parent_pk
    joined, truths = truth_columns(counters, table, pk, lo, hi, ids=ids)
    # A buffered counter's cache is its column plus its pending deltas (same snapshot).
    cached = [cached_value(c) for c in counters]
    cols: list[Any] = [pk.label("pk")]
    for i, (c, t) in enumerate(zip(cached, truths, strict=True)):
        cols += [c.label(f"cached{i}"), t.label(f"actual{i}")]
    differs = sa.or_(*[c.is_distinct_from(t) for c, t in zip(cached, truths, strict=True)])
    return sa.select(*cols).select_from(joined).where(_scope(pk, lo, hi, ids), differs).order_by(pk)


def live_value(counter: Counter, parent_id: Any) -> sa.Select[Any]:
    """The true COUNT/SUM of ``counter`` for one parent, computed from the child table."""
    c = counter
    agg = (
        sa.func.count()
        if c.summed is None and c.where is None
        else sa.func.coalesce(sa.func.sum(contribution(c)), 0)
    )
    return sa.select(agg).where(c.fk == parent_id)


def add_deltas(
    table: sa.Table, pk: sa.Column[Any], columns: Sequence[sa.Column[Any]], *, dialect: str
) -> sa.Update:
    """UPDATE adding per-parent deltas to ``columns`` atomically (``c = c + d``, never read first).

    PostgreSQL gets one ``UPDATE … FROM unnest(…)`` for every parent of the
    table; other databases an executemany. Parameters come from
    :func:`delta_parameters`.
    """
    if dialect == "postgresql":
        arrays = [array_bind("ids", pk.type)]
        for i, col in enumerate(columns):
            arrays.append(array_bind(f"d{i}", col.type))
        v = (
            sa.func.unnest(*arrays)
            .table_valued("pk", *[f"d{i}" for i in range(len(columns))])
            .render_derived(name="v")
        )
        return (
            sa.update(table)
            .values({col.name: col + v.c[f"d{i}"] for i, col in enumerate(columns)})
            .where(pk == v.c.pk)
        )
    return (
        sa.update(table)
        .values({col.name: col + sa.bindparam(f"d{i}") for i, col in enumerate(columns)})
        .where(pk == sa.bindparam("pk_"))
    )


def delta_parameters(
    pk: sa.Column[Any],
    ids: Sequence[Any],
    columns: Sequence[sa.Column[Any]],
    deltas: Mapping[Any, Mapping[sa.Column[Any], int]],
    *,
    dialect: str,
) -> Any:
    """The parameters of :func:`add_deltas` for parents ``ids`` (arrays, or one row per parent)."""
    if dialect == "postgresql":
        params: dict[str, Any] = {"ids": array_value(ids, pk.type)}
        for i, col in enumerate(columns):
            params[f"d{i}"] = array_value([deltas[x].get(col, 0) for x in ids], col.type)
        return params
    return [
        {"pk_": x, **{f"d{i}": deltas[x].get(col, 0) for i, col in enumerate(columns)}} for x in ids
    ]


# --- What child rows count as (live maintenance) -------------------------------------------


def row_state(counters: Sequence[Counter], pk_columns: Sequence[sa.Column[Any]]) -> list[Any]:
    """What one child row counts as: its key ``p<j>``, then parent key ``k<i>`` and value ``v<i>``.

    Used as a SELECT list and as RETURNING columns; read the rows by label,
    since RETURNING may render the columns in any order.
    """
    cols: list[Any] = [col.label(f"p{j}") for j, col in enumerate(pk_columns)]
    for i, counter in enumerate(counters):
        cols.append(counter.fk.label(f"k{i}"))
        cols.append(contribution(counter).label(f"v{i}"))
    return cols


def keys_in(
    pk_columns: Sequence[sa.Column[Any]], keys: Iterable[tuple[Any, ...]], dialect: str = ""
) -> sa.ColumnElement[bool]:
    """``pk`` is one of ``keys``: an array parameter per key column on PostgreSQL, else ``IN``.

    Arrays keep a statement over 100,000 keys within the driver's 65,535
    bound-parameter limit (and a 1,000-row read cheap); the anonymous
    parameters never collide with the caller's own.
    """
    keys = list(keys)
    if dialect in innodb.DIALECTS:  # no row constructors: MariaDB would scan the table
        match: sa.ColumnElement[bool] = innodb.key_match(pk_columns, keys)
        return match
    if dialect != "postgresql":
        if len(pk_columns) == 1:
            return pk_columns[0].in_([k[0] for k in keys])
        return sa.tuple_(*pk_columns).in_(keys)
    arrays = [array_param([k[j] for k in keys], col.type) for j, col in enumerate(pk_columns)]
    if len(pk_columns) == 1:
        return pk_columns[0] == sa.any_(arrays[0])
    return sa.tuple_(*pk_columns).in_(sa.select(*[sa.func.unnest(a) for a in arrays]))


def matching_state(
    counters: Sequence[Counter],
    pk_columns: Sequence[sa.Column[Any]],
    where: sa.ColumnElement[bool] | None,
    *,
    entity: Any = None,
    lock: bool,
    by_primary_key: bool = False,
) -> sa.Select[Any]:
    """Select :func:`row_state` of the child rows matching ``where``, in primary-key order.

    ``by_primary_key`` (MariaDB/MySQL, ``where`` restricted to keys) forces
    the primary key's index, so a locking read locks only those rows.

    With ``lock`` the rows are read ``FOR UPDATE`` (of the child table only), so
    concurrent writers of the same rows queue in key order instead of
    deadlocking. ``entity`` (the statement's mapped class) lets the ORM add its
    own criteria, such as single-table inheritance discriminators.
    """
    stmt = sa.select(*row_state(counters, pk_columns))
    if entity is not None:
        stmt = stmt.select_from(entity)
    if where is not None:
        stmt = stmt.where(where)
    stmt = stmt.order_by(*pk_columns)
    if by_primary_key:
        stmt = stmt.with_hint(pk_columns[0].table, innodb_access.BY_PRIMARY_KEY)
    return stmt.with_for_update(of=pk_columns[0].table) if lock else stmt


def locked_among(
    pk_columns: Sequence[sa.Column[Any]],
    where: sa.ColumnElement[bool] | None,
    *,
    entity: Any = None,
    options: Sequence[Any] = (),
) -> sa.ColumnElement[bool]:
    """``pk IN (SELECT pk … WHERE where ORDER BY pk FOR UPDATE)``, to add to an UPDATE or DELETE.

    The subquery runs in the statement's own snapshot and, having FOR UPDATE,
    as a separate subplan that locks every matching row in primary-key order
    before the statement changes any: no row is touched unseen or locked out
    of order. ``entity`` and ``options`` let the ORM add its criteria.
    """
    sub = sa.select(*pk_columns)
    if entity is not None:
        sub = sub.select_from(entity).options(*options)
    if where is not None:
        sub = sub.where(where)
    sub = sub.order_by(*pk_columns).with_for_update(of=pk_columns[0].table)
    if len(pk_columns) == 1:
        return pk_columns[0].in_(sub)
    return sa.tuple_(*pk_columns).in_(sub)


# --- Association tables (alembic_counterfill.association) -----------------------------------


def matching_links(
    counters: Sequence[Counter], where: sa.ColumnElement[bool] | None, *, lock: bool = True
) -> sa.Select[Any]:
    """Select ``k<i>, v<i>`` (then the key as ``p<j>``) of the association rows ``where`` matches.

    All ``counters`` share one association table. Rows come in key order (the
    FKs when the table has no primary key) and, with ``lock``, ``FOR UPDATE``,
    so writers of the same rows queue instead of deadlocking.
    """
    table = counters[0].child_table
    pk = list(table.primary_key.columns)
    cols: list[Any] = []
    for i, counter in enumerate(counters):
        cols.append(counter.fk.label(f"k{i}"))
        cols.append(contribution(counter).label(f"v{i}"))
    cols += [col.label(f"p{j}") for j, col in enumerate(pk)]
    stmt = sa.select(*cols)
    if where is not None:
        stmt = stmt.where(where)
    stmt = stmt.order_by(*(pk or [c.fk for c in counters]))
    return stmt.with_for_update() if lock else stmt


def among(columns: Sequence[sa.Column[Any]], values: Sequence[tuple[Any, ...]]) -> Any:
    """``(columns) IN (values)``: a plain ``IN`` for one column, a tuple ``IN`` for several."""
    if len(columns) == 1:
        return columns[0].in_([v[0] for v in values])
    return sa.tuple_(*columns).in_(values)


# --- Buffered (hot-parent) counters: the deltas tables of :mod:`.buffer` -------------------


def pending_deltas(counter: Counter, parent_pk: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The sum of ``counter``'s pending deltas for the parent row ``parent_pk`` (correlated)."""
    table = buffer.deltas_of(counter.parent_table)
    assert table is not None
    d = table.alias("pending")
    total = sa.select(sa.func.coalesce(sa.func.sum(d.c[counter.column.name]), 0))
    return total.where(d.c.parent_id == parent_pk).scalar_subquery()


def cached_value(
    counter: Counter, parent_pk: sa.ColumnElement[Any] | None = None
) -> sa.ColumnElement[Any]:
    """What the cache says ``counter`` is: its column, plus pending deltas when buffered."""
    if not buffer.is_buffered(counter):
        return counter.column
    pk = counter.parent_pk if parent_pk is None else parent_pk
    return counter.column + pending_deltas(counter, pk)


def exact_value(counter: Counter, parent_id: Any) -> sa.Select[Any]:
    """Select one parent's column plus its pending deltas, in one statement (one snapshot)."""
    return sa.select(cached_value(counter)).where(counter.parent_pk == parent_id)


def append_deltas(deltas_table: sa.Table) -> sa.Insert:
    """INSERT of delta rows (``parent_id``, counter columns), executed with a row per parent.

    One construct per deltas table, built once: every buffered writer's
    commit runs it, and building it anew (plus its cache key) was a
    measurable part of a hot parent's per-commit Python time.
    """
    stmt = _APPEND.get(deltas_table)
    if stmt is None:
        stmt = _APPEND[deltas_table] = sa.insert(deltas_table)
    return stmt


# deltas table -> its INSERT construct (weak: tables of discarded MetaData go with it)
_APPEND: weakref.WeakKeyDictionary[sa.Table, sa.Insert] = weakref.WeakKeyDictionary()


def discard_deltas(
    counters: Sequence[Counter], lo: Any, hi: Any, ids: Sequence[Any] | None, dialect: str = ""
) -> sa.Delete | sa.Update:
    """Remove the pending deltas of ``counters`` for parents in the range.

    Rows are deleted when the counters are all of the table's buffered ones;
    otherwise only their columns are zeroed (the other counters' deltas stay).
    """
    table = buffer.deltas_of(counters[0].parent_table)
    assert table is not None
    where = _scope(table.c.parent_id, lo, hi, ids, dialect)
    names = {c.column.name for c in counters if buffer.is_buffered(c)}
    if names >= set(buffer.counter_names(counters[0].parent_table)):
        return sa.delete(table).where(where)
    return sa.update(table).where(where).values({n: 0 for n in sorted(names)})


def recount_statements(
    counters: Sequence[Counter],
    lo: Any,
    hi: Any,
    *,
    ids: Sequence[Any] | None = None,
    dialect: str = "",
) -> list[Any]:
    """The statements setting ``counters`` to their truth over the range; the LAST one's rowcount
    is the rows changed.

    Buffered counters also lose their pending deltas for the range, and on
    PostgreSQL both happen in ONE statement (a data-modifying ``WITH``): one
    snapshot in which each writer's child row and delta row are either both
    visible (counted, delta removed) or both invisible (not counted, delta
    kept). Two statements would lose or double-count the writers committing
    between them. SQLite has one writer at a time, so two statements in the
    caller's transaction see the same data.
    """
    recount = recount_range(counters, lo, hi, ids=ids)
    if not any(buffer.is_buffered(c) for c in counters):
        return [recount]
    gone = discard_deltas(counters, lo, hi, ids, dialect)
    if dialect == "postgresql":
        table = buffer.deltas_of(counters[0].parent_table)
        assert table is not None
        return [recount.add_cte(gone.returning(table.c.id).cte("discarded"))]
    return [gone, recount]


def pending_parents(
    deltas_table: sa.Table, limit: int, ids: Sequence[Any] | None
) -> sa.Select[Any]:
    """Up to ``limit`` parents with pending deltas, in key order (narrowed to ``ids``)."""
    stmt = sa.select(deltas_table.c.parent_id).distinct().order_by(deltas_table.c.parent_id)
    if ids is not None:
        stmt = stmt.where(deltas_table.c.parent_id.in_(list(ids)))
    return stmt.limit(limit)


def fold_moved(
    parent: sa.Table, deltas_table: sa.Table, chosen: Sequence[Any], dialect: str
) -> list[Any]:
    """The statements folding the pending deltas of parents ``chosen`` (already locked).

    Each returns, when it returns rows, ``(deltas moved, oldest created_at)``.
    PostgreSQL: ONE statement that deletes the rows and adds exactly what it
    deleted (``WITH moved AS (DELETE … RETURNING …) … UPDATE parent … FROM
    (SELECT sum(…) FROM moved GROUP BY parent_id)``). Other databases (one
    writer at a time): add, count, delete, in the caller's transaction.
    """
    pk = next(iter(parent.primary_key.columns))
    names = buffer.counter_names(parent)
    d = deltas_table
    if dialect == "postgresql":
        ids = array_param(chosen, pk.type)
        moved = (
            sa.delete(d)
            .where(d.c.parent_id == sa.any_(ids))
            .returning(d.c.parent_id, d.c.created_at, *[d.c[n] for n in names])
            .cte("moved")
        )
        sums = (
            sa.select(moved.c.parent_id, *[sa.func.sum(moved.c[n]).label(n) for n in names])
            .group_by(moved.c.parent_id)
            .subquery("sums")
        )
        added = (
            sa.update(parent)
            .values({n: parent.c[n] + sums.c[n] for n in names})
            .where(pk == sums.c.parent_id)
            .returning(pk)
            .cte("added")
        )
        summary = sa.select(sa.func.count(), sa.func.min(moved.c.created_at)).select_from(moved)
        return [summary.add_cte(added)]
    alias = d.alias("d")
    add = (
        sa.update(parent)
        .where(pk.in_(list(chosen)))
        .values(
            {
                n: parent.c[n]
                + sa.select(sa.func.coalesce(sa.func.sum(alias.c[n]), 0))
                .where(alias.c.parent_id == pk)
                .scalar_subquery()
                for n in names
            }
        )
    )
    where = d.c.parent_id.in_(list(chosen))
    count = sa.select(sa.func.count(), sa.func.min(d.c.created_at)).where(where)
    return [add, count, sa.delete(d).where(where)]


def pending_summary(deltas_table: sa.Table) -> sa.Select[int, Any]:
    """Select how many deltas are pending and the oldest one's ``created_at``."""
    return sa.select(sa.func.count(), sa.func.min(deltas_table.c.created_at))
