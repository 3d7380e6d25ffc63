"""Counter deltas of one write: accumulate them, apply them to the parents, expire loaded parents.

Every write path ends here. Parent tables are visited in name order and
parents in primary-key order, the order every flush and bulk statement locks
them in, so two writers never deadlock on parents.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.base import instance_state

from . import buffer, folding, innodb, innodb_deltas, sql
from .arrays import array_bind, array_value
from .counters import Counter
from .plan import WritePlan

#: ``{parent_mapper: {parent_id: {counter: delta}}}``.
Deltas = dict[Mapper[Any], dict[Any, dict[Counter, Any]]]
#: Parents whose counters are set to their exact truth: ``{counter: {parent_id, ...}}``.
Recounts = dict[Counter, set[Any]]
#: Counter attributes of loaded parents to expire: ``{(parent_mapper, parent_id): {attr, ...}}``.
Expiry = dict[tuple[Mapper[Any], Any], set[str]]

#: Keys per ``IN (...)``: well under SQLite's 32,766 bound parameters per statement.
CHUNK = 5000

# Session.info key of the expiry scheduled by apply() for the end of the flush.
_EXPIRE = "counterfill.expire"


def new_deltas() -> Deltas:
    """An empty, auto-vivifying delta map."""
    return defaultdict(lambda: defaultdict(lambda: defaultdict(int)))


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most :data:`CHUNK` items."""
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def add_rows(
    deltas: Deltas, plan: WritePlan, rows: Iterable[Any], sign: int, prefix: str = ""
) -> None:
    """Add ``sign`` times each row's ``<prefix>k<i>``/``<prefix>v<i>`` (:func:`.sql.row_state`)."""
    rows = rows if isinstance(rows, list) else list(rows)
    if not rows:
        return
    fields = rows[0]._fields  # by label: RETURNING may order the columns its own way
    for i, counter in enumerate(plan.counters):
        pids = map(itemgetter(fields.index(f"{prefix}k{i}")), rows)
        values = map(itemgetter(fields.index(f"{prefix}v{i}")), rows)
        if counter.summed is None:  # values are 0/1: let Counter tally them in C
            per_parent = totals([pid for pid, value in zip(pids, values, strict=True) if value])
        else:
            per_parent = totals(list(pids), list(values))
        add_totals(deltas, counter, per_parent, sign)


def add_columns(
    deltas: Deltas,
    plan: WritePlan,
    columns: Sequence[tuple[Sequence[Any], Sequence[Any] | None]],
    sign: int,
) -> None:
    """Add ``sign`` times :meth:`.WritePlan.inserted_columns` (per counter: keys, values)."""
    for counter, (pids, values) in zip(plan.counters, columns, strict=True):
        add_totals(deltas, counter, totals(pids, values), sign)


def totals(pids: Sequence[Any], values: Sequence[Any] | None = None) -> dict[Any, Any]:
    """Per parent: how many ``pids`` name it, or the sum of their ``values`` (no ``None`` key)."""
    per_parent: dict[Any, Any]
    if values is None:  # a count: let Counter tally the keys in C
        per_parent = Tally(pids)
    else:
        per_parent = defaultdict(int)
        for pid, value in zip(pids, values, strict=True):
            if value:
                per_parent[pid] += value
    per_parent.pop(None, None)
    return per_parent


def add_totals(deltas: Deltas, counter: Counter, per_parent: dict[Any, Any], sign: int) -> None:
    """Add ``sign`` times each parent's total to ``counter``'s deltas."""
    target = deltas[counter.parent_mapper]
    for parent_id, total in per_parent.items():
        target[parent_id][counter] += sign * total


def _table_name(mapper: Mapper[Any]) -> str:
    return str(getattr(mapper.local_table, "name", ""))


def apply(session: Session, deltas: Deltas) -> None:
    """Apply per-parent deltas atomically (``c = c + d``) and schedule the parents' expiry.

    Parent tables are visited in name order and parents in key order, so two
    transactions always lock in the same order. :func:`expire_now` expires
    the scheduled attributes (at the end of the flush, or right away).
    """
    expire = session.info.setdefault(_EXPIRE, defaultdict(set))
    for parent_mapper in sorted(deltas, key=_table_name):
        per_parent = {
            pid: {c.column: d for c, d in ds.items() if d}
            for pid, ds in deltas[parent_mapper].items()
        }
        per_parent = {pid: ds for pid, ds in per_parent.items() if ds}
        if not per_parent:
            continue
        any_counter = next(iter(next(iter(deltas[parent_mapper].values()))))
        connection = session.connection(bind_arguments={"mapper": parent_mapper})
        table = any_counter.parent_table
        buffered = buffer.deltas_of(table) is not None
        if buffered:
            # Buffered (hot-parent) counters append to their deltas table instead.
            per_parent, appended = buffer.split(table, per_parent)
            if appended and session._flushing:
                # A parent this flush deletes takes its count with it: a delta row
                # for it would break the deltas table's foreign key.
                gone = _deleted_ids(session, parent_mapper)
                appended = {pid: ds for pid, ds in appended.items() if pid not in gone}
            if appended:
                _append(connection, table, appended)
                folding.appended(session, table)
        if per_parent:
            _add_to_parents(connection, any_counter, per_parent)
        # Outside a flush only parents loaded in this session need expiring (a
        # bulk statement may touch 10,000 parents and load none). Inside one,
        # parents the flush inserts join the identity map only after it.
        loaded = None if session._flushing else _loaded_ids(session, parent_mapper)
        for pid, ds in deltas[parent_mapper].items():
            if loaded is not None and pid not in loaded:
                continue
            if buffered:  # a buffered column did not change: nothing to reload
                ds = {c: d for c, d in ds.items() if not buffer.is_buffered(c)}
            expire[(parent_mapper, pid)].update(c.attr_key for c in ds)


def _deleted_ids(session: Session, mapper: Mapper[Any]) -> set[Any]:
    """Keys of the ``mapper`` objects this flush deletes (``after_flush`` still lists them)."""
    out = set()
    for obj in session.deleted:
        st = instance_state(obj)
        if st.mapper.isa(mapper) and st.key is not None:
            out.add(st.key[1][0])
    return out


def _loaded_ids(session: Session, mapper: Mapper[Any]) -> set[Any]:
    ident_cls = mapper.identity_key_from_primary_key((None,))[0]
    keys = session.identity_map.keys()
    return {k[1][0] for k in keys if k[0] is ident_cls}


def _append(connection: Connection, parent: Any, per_parent: dict[Any, Any]) -> None:
    """Append one deltas row per parent: an insert, which no other writer waits for."""
    buffer.check_dialect(connection, parent)
    deltas_table = buffer.deltas_of(parent)
    assert deltas_table is not None
    names = sorted({col.name for d in per_parent.values() for col in d})
    rows = []
    for pid in sorted(per_parent):
        by_name = {col.name: d for col, d in per_parent[pid].items()}
        rows.append({"parent_id": pid, **{n: by_name.get(n, 0) for n in names}})
    # One parent (a hot parent's usual writer): a plain execute, not an executemany.
    connection.execute(sql.append_deltas(deltas_table), rows[0] if len(rows) == 1 else rows)


def _add_to_parents(connection: Connection, counter: Counter, per_parent: dict[Any, Any]) -> None:
    # PostgreSQL: lock several parents in key order first, since the UPDATE
    # itself visits them in whatever order its plan chooses. SQLite has one writer.
    table, pk = counter.parent_table, counter.parent_pk
    if innodb.is_innodb(connection.dialect):
        innodb.apply_deltas(connection, table, pk, per_parent)
        return
    dialect = connection.dialect.name
    ids = sorted(per_parent)
    columns = tuple(sorted({col for d in per_parent.values() for col in d}, key=lambda c: c.name))
    if dialect == "postgresql" and len(ids) > 1:
        connection.execute(_lock_by_array(table, pk), {"ids": array_value(ids, pk.type)})
    connection.execute(
        _add_deltas(table, pk, columns, dialect),
        sql.delta_parameters(pk, ids, columns, per_parent, dialect=dialect),
    )


# The statements of every flush's deltas are built once per table (and
# columns), not per flush: a new construct costs its building and its cache
# key (bench/live_overhead.py, docs/performance.md). Bounded, since tests and
# short-lived metadata create many tables.
@lru_cache(maxsize=256)
def _lock_by_array(table: sa.Table, pk: sa.Column[Any]) -> sa.Select[Any]:
    """PostgreSQL: lock the parents of the ``ids`` array parameter in key order; count them."""
    inner = (
        sa.select(pk)
        .where(pk == sa.any_(array_bind("ids", pk.type)))
        .order_by(pk)
        .with_for_update(key_share=True)
        .subquery("locked")
    )
    return sa.select(sa.func.count()).select_from(inner)


@lru_cache(maxsize=256)
def _add_deltas(
    table: sa.Table, pk: sa.Column[Any], columns: tuple[sa.Column[Any], ...], dialect: str
) -> sa.Update:
    """:func:`.sql.add_deltas`, built once per table, columns and dialect."""
    return sql.add_deltas(table, pk, columns, dialect=dialect)


def settle(session: Session, deltas: Deltas, recounts: Recounts | None = None) -> None:
    """Apply deltas and exact recounts parent table by parent table, then expire loaded parents.

    For a bulk statement (no flush follows it): tables go in name order and
    parents in key order, as :func:`apply` does.
    """
    wanted: dict[Mapper[Any], dict[Counter, set[Any]]] = defaultdict(dict)
    for counter, ids in (recounts or {}).items():
        ids = {x for x in ids if x is not None}
        if ids:
            wanted[counter.parent_mapper][counter] = ids
    expire: Expiry = defaultdict(set)
    for mapper in sorted(set(deltas) | set(wanted), key=_table_name):
        if mapper in wanted:
            # Deltas and recounts lock in two statements: lock the union first,
            # in one key-ordered pass, or two passes could interleave out of order.
            ids = set(deltas.get(mapper, ())).union(*wanted[mapper].values())
            _lock(session, mapper, next(iter(wanted[mapper])), sorted(ids))
        if deltas.get(mapper):
            apply(session, {mapper: deltas[mapper]})
        if mapper in wanted:
            _recount(session, mapper, wanted[mapper], expire)
    # Inside a flush, the flush's own after_flush_postexec expires them.
    if not session._flushing:
        expire_now(session, expire)


def schedule_expiry(session: Session, recounts: Recounts) -> None:
    """Expire recounted parents at the end of the flush, like :func:`apply` does for deltas."""
    expire = session.info.setdefault(_EXPIRE, defaultdict(set))
    for counter, ids in recounts.items():
        for pid in ids:
            expire[(counter.parent_mapper, pid)].add(counter.attr_key)


def lock_first(
    session: Session,
    parents: dict[Counter, set[Any]],
    *,
    shared_buffered: bool = False,
    fk_checked: bool = False,
) -> None:
    """On InnoDB, lock these parents, by table name and key, before a child write.

    A child INSERT or FK move takes a shared lock on its parent for the
    foreign-key check; writers holding it that then want the exclusive lock
    for their delta deadlock (InnoDB has no ``FOR NO KEY UPDATE``). So the
    parents are locked exclusively up front. With ``shared_buffered`` (a
    flush, which only appends deltas for buffered counters and never
    recounts them), parents only buffered counters name are locked *shared*
    instead, in the same key order: writers of a hot parent do not queue,
    and a fold (exclusive, key order) cannot deadlock with them. Elsewhere
    this does nothing: the deltas lock the parents afterwards.

    ``fk_checked``: every parent is named by a child row the write INSERTs
    (a flush of new children only), whose foreign-key check takes the shared
    lock before any delta row exists; then a write whose only parent lock is
    one shared key skips the statement. Otherwise (a child UPDATE or DELETE,
    a bulk statement) the first lock on that parent would come only with the
    delta row's INSERT, after the write's other locks. Skipping it there
    made bulk UPDATEs of one hot parent deadlock with real workers' folds and
    batches on MariaDB (tests/test_buffered_concurrency.py, 4 runs of 4;
    0 of 3 with the statement); the exact interleaving was not isolated.
    """
    by_table: dict[Mapper[Any], tuple[Counter, set[Any], set[Any]]] = {}
    for counter, ids in parents.items():
        slot = by_table.setdefault(counter.parent_mapper, (counter, set(), set()))
        keys = slot[2] if shared_buffered and buffer.is_buffered(counter) else slot[1]
        keys.update(x for x in ids if x is not None)
    if fk_checked and _one_shared_key(by_table.values()):
        # Its only parent lock is the child's own foreign-key check: one lock
        # cannot be taken out of order, so the extra statement is spared.
        return
    for mapper in sorted(by_table, key=_table_name):
        counter, exclusive, shared = by_table[mapper]
        conn = session.connection(bind_arguments={"mapper": mapper})
        if not innodb.is_innodb(conn.dialect):
            return
        if exclusive or shared:
            table, pk = counter.parent_table, counter.parent_pk
            innodb.lock_parents_by_mode(conn, table, pk, exclusive, shared)


def _one_shared_key(slots: Iterable[tuple[Counter, set[Any], set[Any]]]) -> bool:
    """Whether the write locks no parent exclusively and exactly one parent shared."""
    shared = 0
    for _, exclusive, keys in slots:
        if exclusive:
            return False
        shared += len(keys)
    return shared == 1


def _lock(session: Session, mapper: Mapper[Any], counter: Counter, ids: list[Any]) -> None:
    conn = session.connection(bind_arguments={"mapper": mapper})
    if innodb.is_innodb(conn.dialect):
        innodb.lock_parent_keys(conn, counter.parent_table, counter.parent_pk, ids)
    elif conn.dialect.name != "sqlite":  # SQLite has one writer: nothing to wait for
        for part in chunks(ids):
            conn.execute(
                sql.lock_parents(counter.parent_table, counter.parent_pk, None, None, ids=part)
            )


def _recount(
    session: Session, mapper: Mapper[Any], wanted: dict[Counter, set[Any]], expire: Expiry
) -> None:
    # The batch protocol: the parents are already locked (settle()); recount
    # in new statements, whose snapshot includes every writer we waited for.
    counters = sorted(wanted, key=lambda c: c.key)
    ids = sorted(set().union(*wanted.values()))
    conn = session.connection(bind_arguments={"mapper": mapper})
    for part in chunks(ids):
        if innodb.is_innodb(conn.dialect):  # REPEATABLE READ: a plain read may be stale
            innodb_deltas.discard_locked(conn, counters, None, None, part)  # buffered counters
            innodb.recount_in_transaction(conn, counters, part, sql.contribution)
            continue
        # Buffered counters: the recount also removes their pending deltas.
        for stmt in sql.recount_statements(
            counters, None, None, ids=part, dialect=conn.dialect.name
        ):
            conn.execute(stmt)
    for pid in ids:
        expire[(mapper, pid)].update(c.attr_key for c in counters)


def expire_now(session: Session, extra: Expiry | None = None) -> None:
    """Expire counter attributes of loaded parents: those :func:`apply` scheduled, and ``extra``.

    An expired attribute reloads on next access and is never written back, so
    a parent's own flush cannot overwrite a counter with a stale value.
    """
    todo: Expiry = dict(extra or {})
    for key, attrs in (session.info.pop(_EXPIRE, None) or {}).items():
        todo.setdefault(key, set()).update(attrs)
    identity_map = session.identity_map
    classes: dict[Mapper[Any], Any] = {}  # each mapper's identity class, looked up once
    for (mapper, pid), attrs in todo.items():
        cls = classes.get(mapper)
        if cls is None:
            cls = classes[mapper] = mapper.identity_key_from_primary_key((None,))[0]
        obj = identity_map.get((cls, (pid,), None))  # identity_key_from_primary_key's key
        if obj is not None:
            session.expire(obj, list(attrs))


def forget(session: Session) -> None:
    """Drop the expiry scheduled for this session (its transaction rolled back)."""
    session.info.pop(_EXPIRE, None)
