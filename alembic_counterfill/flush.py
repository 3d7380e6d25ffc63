"""Flush handler: turn each ORM flush into atomic counter deltas in the same transaction.

Protocol (docs/increment-logic.md): before the flush writes, the old state of
every touched child row (parent key and contribution per counter) is read from
the database under ``FOR UPDATE``; after it writes, the new state is read the
same way; the delta per parent is new minus old, coalesced and applied once per
parent table in primary-key order. Reading the database, not the session's
copy, keeps counters exact with expired or stale objects and arbitrary
``where=`` expressions. :mod:`.events` registers these handlers.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import EXT_CONTINUE, Mapper, Session, UOWTransaction
from sqlalchemy.orm import base as orm_base
from sqlalchemy.orm.attributes import PASSIVE_NO_INITIALIZE, get_history, instance_state
from sqlalchemy.orm.state import InstanceState

from . import association, innodb, innodb_access, sql, sqlite_lock
from . import deltas as _deltas
from .counters import Counter
from .errors import DuplicateKeyError, ReinsertedRowError
from .pause import is_paused
from .plan import (
    Key,
    WritePlan,
    counted_collections,
    plan_for,
    plans_for,
    uncounted_parent_fks,
)

_STASH = "counterfill.flush"


def _read(connection: sa.Connection, plan: WritePlan, keys: set[Key], *, lock: bool) -> list[Any]:
    dialect = connection.dialect.name
    where = sql.keys_in(plan.pk_columns, keys, dialect)
    # InnoDB's REPEATABLE READ would answer a plain read from the transaction's
    # first snapshot (a row deleted since would still count): a locking read,
    # by primary key only, sees the latest rows, which we hold anyway.
    mysql = innodb.is_innodb(connection.dialect)
    stmt = sql.matching_state(
        plan.counters, plan.pk_columns, where, lock=lock or mysql, by_primary_key=mysql
    )
    return list(connection.execute(stmt).all())


def _keys_of(plan: WritePlan, rows: list[Any]) -> set[Key]:
    return {tuple(r._mapping[f"p{j}"] for j in range(len(plan.pk_columns))) for r in rows}


@dataclass(eq=False)
class _FlushState:
    """Old rows read before the flush and keys to re-read after it, per plan."""

    old: dict[WritePlan, list[Any]] = field(default_factory=lambda: defaultdict(list))
    captured: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    touched: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    # Objects inserted by the flush whose contributions are read off them in after_flush.
    inserted: dict[WritePlan, list[InstanceState[Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # Captured keys whose row the locking reads did not find (another
    # transaction deleted it): this flush's DELETE or UPDATE must match none.
    missing: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    # PostgreSQL, and InnoDB at READ COMMITTED: missing keys to read again once
    # the parents their copies name are locked with the flush's other parents.
    reread: dict[WritePlan, set[Key]] = field(default_factory=lambda: defaultdict(set))
    copy_parents: dict[Counter, set[Any]] = field(default_factory=lambda: defaultdict(set))
    watched: list[sa.Connection] = field(default_factory=list)

    def capture(
        self,
        connection: sa.Connection,
        plan: WritePlan,
        keys: set[Key],
        states: Mapping[Key, InstanceState[Any]] | None = None,
    ) -> None:
        keys = keys - self.captured[plan]
        if not keys:
            return
        self.captured[plan] |= keys
        sqlite_lock.begin_write(connection)  # several SQLite writers: read under the lock
        rows = _read(connection, plan, keys, lock=True)
        self.old[plan].extend(rows)
        missing = keys - _keys_of(plan, rows)
        if not missing:
            return
        if states and (connection.dialect.name == "postgresql" or _gap_unlocked(connection)):
            self.reread[plan] |= missing
            for counter, ids in _copy_parents(plan, missing, states).items():
                self.copy_parents[counter] |= ids
        self.missing[plan] |= missing
        self.watch(connection)

    def reread_vanished(self, session: Session) -> None:
        """Read the missing keys again, now that their copies' parents are locked."""
        for plan, keys in sorted(self.reread.items(), key=lambda kv: kv[0].table.name):
            connection = session.connection(bind_arguments={"mapper": plan.mapper})
            again = _read(connection, plan, keys, lock=True)
            self.old[plan].extend(again)
            self.missing[plan] -= _keys_of(plan, again)
        self.reread.clear()

    def watch(self, connection: sa.Connection) -> None:
        """Check this flush's DELETE and UPDATE statements on ``connection``."""
        if _watched.get(connection) is not self:
            _watched[connection] = self
            self.watched.append(connection)
            if _listen is not None:
                _listen(connection)

    def unwatch(self) -> None:
        """Stop checking statements (the flush's own writes are done, or it failed)."""
        for connection in self.watched:
            if _watched.get(connection) is self:
                del _watched[connection]
        self.watched.clear()


#: Connections whose flush found keys missing, and that flush's state.
_watched: weakref.WeakKeyDictionary[sa.Connection, _FlushState] = weakref.WeakKeyDictionary()

#: Routes a connection's statements to :func:`statement_ran` (set by :mod:`.events`).
_listen: Callable[[sa.Connection], None] | None = None


def listen_with(register: Callable[[sa.Connection], None]) -> None:
    """Use ``register(connection)`` to have a watched connection's statements checked.

    :mod:`.events` owns every event registration; it hands this module the
    function that listens on one connection, so that only connections whose
    flush found a row gone pay for the check.
    """
    global _listen
    _listen = register


def _gap_unlocked(connection: sa.Connection) -> bool:
    """Whether InnoDB left the gap of a missing key unlocked (READ COMMITTED and below).

    Under REPEATABLE READ (and SERIALIZABLE) the locking read of a missing
    key locks the gap where it would be, so no other transaction can insert
    that key until this one ends: nothing to re-read, and locking parents
    there would deadlock with an inserter that holds them and waits for the gap.
    """
    return innodb.is_innodb(connection.dialect) and innodb.reads_latest(connection)


def _copy_parents(
    plan: WritePlan, missing: set[Key], states: Mapping[Key, InstanceState[Any]]
) -> dict[Counter, set[Any]]:
    """The parents the session's copies of the ``missing`` rows name (committed and pending)."""
    out: dict[Counter, set[Any]] = defaultdict(set)
    fk_keys = _attribute_keys(plan.mapper, [c.fk for c in plan.counters])
    for key in missing:
        st = states.get(key)
        if st is None:
            continue
        for counter, attr in zip(plan.counters, fk_keys, strict=True):
            if attr is None:  # an unmapped FK column: the copy cannot name the parent
                continue
            for value in (st.committed_state.get(attr), st.dict.get(attr)):
                if value is not None and not isinstance(value, type(orm_base.NO_VALUE)):
                    out[counter].add(value)
    return out


def _lock_to_reread(
    session: Session, state: _FlushState, links: Mapping[Any, set[Any]] | None
) -> None:
    """PostgreSQL: lock every parent of the flush in one key-ordered pass, then re-read gone keys.

    A row this flush deletes or updates may have been deleted by another
    transaction (the locking read waited for it and found nothing), and a third
    one may insert a row with the same key and commit before this flush's
    DELETE or UPDATE, which would then hit that new row unseen: silent drift.
    The inserter applies its delta to the parents its row names before it
    commits; natural keys (a composite of the counted foreign keys, the
    common re-inserted case) name the same parents as the session's copy. So
    those parents are locked and the keys read again: a row committed before
    the lock is counted here; one committed after it cannot be, since its
    inserter waits for this transaction, and its uncommitted row is invisible
    to this flush's statements. A row re-inserted naming other parents is
    caught by :func:`statement_ran`. InnoDB does the same in
    :func:`_lock_before_writes`.

    The copies' parents are locked with every other parent the flush's deltas
    will lock (:func:`_flush_parents`), by table name and then key: locking
    them alone, then the others with the deltas, took parents in two
    key-ordered passes, and two such flushes (or one and a writer applying its
    deltas) deadlocked (tests/test_natural_key_bulk_races.py). The re-read
    itself still takes rows after parents: a row re-inserted under a gone
    key and held by a writer waiting for those parents deadlocks with it
    (docs/databases.md, "Known gaps").
    """
    parents, _ = _flush_parents(session, state, links)
    by_table: dict[sa.Table, tuple[Counter, set[Any]]] = {}
    for counter, ids in parents.items():
        by_table.setdefault(counter.parent_table, (counter, set()))[1].update(ids)
    for table in sorted(by_table, key=lambda t: t.name):
        counter, ids = by_table[table]
        ids.discard(None)
        if ids:
            connection = session.connection(bind_arguments={"mapper": counter.parent_mapper})
            dialect = connection.dialect.name
            stmt = sql.lock_parents(
                table, counter.parent_pk, None, None, ids=sorted(ids), dialect=dialect
            )
            connection.execute(stmt)
    state.reread_vanished(session)


def statement_ran(
    conn: sa.Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    """Refuse a flush whose DELETE or UPDATE matched a row its locking reads did not find.

    Rows the locking reads found are held by this transaction; a key they
    found missing must match nothing. If it matches, another transaction
    re-inserted the row after this flush read it (a surrogate key re-used
    with other parents, which the parent locks of :func:`_lock_to_reread` do not
    cover): its counters were never read as old state, so the flush is
    stopped and its transaction rolled back. A row simply gone matches
    nothing and keeps SQLAlchemy's own warning. Listens only on connections
    whose flush found a key missing (:mod:`.events`, :func:`listen_with`);
    returns at once once that flush is over.
    """
    if not _watched:
        return
    state = _watched.get(conn)
    if state is None:
        return
    dml = getattr(getattr(context, "compiled", None), "statement", None)
    if not isinstance(dml, (sa.Update, sa.Delete)):
        return
    rowcount = cursor.rowcount
    for plan, missing in state.missing.items():
        if not missing or dml.table is not plan.table:
            continue
        binds = _key_binds(dml, plan.pk_columns)
        if binds is None:
            continue
        params = context.compiled_parameters or [{}]
        hit = [p for p in params if tuple(p.get(b) for b in binds) in missing]
        if hit and isinstance(rowcount, int) and rowcount > len(params) - len(hit):
            verb = "deletes" if isinstance(dml, sa.Delete) else "updates"
            key = tuple(hit[0].get(b) for b in binds)
            raise ReinsertedRowError(
                f"a row this flush {verb} ({plan.table.name} {key!r}) was re-inserted by "
                "another transaction while it ran; retry the transaction (this flush was "
                "rolled back, nothing was written)"
            )


def _key_binds(dml: Any, pk_columns: list[sa.Column[Any]]) -> list[str] | None:
    """The bound parameter compared with each key column in ``dml``'s WHERE (None: not that form).

    The unit of work's statements read ``pk = :name AND …``.
    """
    where = dml.whereclause
    if where is None:
        return None
    terms = list(where.clauses) if isinstance(where, sa.BooleanClauseList) else [where]
    names: dict[sa.Column[Any], str] = {}
    for term in terms:
        left, right = getattr(term, "left", None), getattr(term, "right", None)
        if getattr(term, "operator", None) is not sa.sql.operators.eq:
            continue
        if isinstance(left, sa.Column) and isinstance(right, sa.BindParameter):
            names[left] = str(right.key)
    out = [names.get(col) for col in pk_columns]
    return None if None in out else [str(n) for n in out]


def _stash(session: Session) -> _FlushState | None:
    return session.info.get(_STASH)


def before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    """Read (and lock) the old state of the deleted and relevantly dirty children."""
    previous = session.info.pop(_STASH, None)
    if previous is not None:
        previous.unwatch()
    if is_paused():
        return
    state = _FlushState()
    session.info[_STASH] = state
    association.begin_flush(session)
    wanted: dict[WritePlan, set[Key]] = defaultdict(set)
    copies: dict[WritePlan, dict[Key, InstanceState[Any]]] = defaultdict(dict)
    deleted = session.deleted
    for obj in (*session.dirty, *deleted):
        st: InstanceState[Any] = instance_state(obj)
        if st.key is None:
            continue
        for plan in plans_for(st.mapper):
            if obj in deleted or plan.may_change(st):
                wanted[plan].add(tuple(st.key[1]))
                copies[plan][tuple(st.key[1])] = st
        for child in _collection_changes(st):
            for plan in plans_for(child.mapper):
                wanted[plan].add(tuple(child.key[1]))  # type: ignore[index]
    after_parents: dict[WritePlan, set[Key]] = {}
    for plan, keys in sorted(wanted.items(), key=lambda kv: kv[0].table.name):
        if plan.key_parents() is not None and _plan_on_innodb(session, plan):
            after_parents[plan] = keys  # natural keys on InnoDB: parents first
            continue
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        state.capture(connection, plan, keys, copies.get(plan))
    links = association.collection_parents(session)
    if _on_innodb(session, wanted) or _links_on_innodb(session, links):
        _lock_before_writes(session, state, links, flush_context, after_parents)
    if state.reread:  # PostgreSQL: keys found gone (InnoDB has re-read its own)
        _lock_to_reread(session, state, links)


def _plan_on_innodb(session: Session, plan: WritePlan) -> bool:
    return innodb.is_innodb(session.get_bind(mapper=plan.mapper).dialect)


def _on_innodb(session: Session, wanted: dict[WritePlan, set[Key]]) -> bool:
    classes = {type(o) for o in session.new}  # per class, not per object: flushes can be large
    mappers = {p.mapper for p in wanted} | {sa.inspect(cls) for cls in classes}
    plans = [p for p in map(plan_for, mappers) if p is not None]
    return any(innodb.is_innodb(session.get_bind(mapper=p.mapper).dialect) for p in plans)


def _links_on_innodb(session: Session, links: Mapping[Any, set[Any]]) -> bool:
    mappers = {c.parent_mapper for c in links}
    return any(innodb.is_innodb(session.get_bind(mapper=m).dialect) for m in mappers)


def _attribute_keys(mapper: Mapper[Any], columns: list[Any]) -> list[str | None]:
    """The attribute key mapping each column on ``mapper`` (None: unmapped)."""
    out: list[str | None] = []
    for col in columns:
        try:
            out.append(mapper.get_property_by_column(col).key)
        except Exception:  # an unmapped column: nothing in the session can name it
            out.append(None)
    return out


def _flush_parents(
    session: Session,
    state: _FlushState,
    links: Mapping[Any, set[Any]] | None = None,
    after_parents: Mapping[WritePlan, set[Key]] | None = None,
    *,
    fk_checks: bool = False,
) -> tuple[dict[Any, set[Any]], dict[WritePlan, set[Key]]]:
    """Every parent this flush's writes and deltas will lock, per counter; new explicit keys.

    The parents of the rows read (:attr:`_FlushState.old`), of the copies of
    rows found gone, of the new and dirty objects (their FK values, or the
    parent object a relationship will sync), of persistent parents' changed
    one-to-many collections, of association-table ``links`` and of the
    natural keys in ``after_parents``. The second value: the explicit primary
    keys of new objects, per plan (rows they may collide with).

    ``fk_checks`` (InnoDB): also the parent rows that foreign keys counting
    nothing will check (:func:`.plan.uncounted_parent_fks`) on rows the flush
    inserts or re-points, e.g. a comment's author when only its article is
    counted. Each such check takes a shared lock on a row of a table whose
    rows this flush locks exclusively; taken after them, out of key order, it
    deadlocked with a writer holding that row and waiting for ours (the
    Conduit application's comments and follows, tests/test_realapp_patterns.py).
    """
    parents: dict[Any, set[Any]] = defaultdict(set)
    for counter, keys in (links or {}).items():
        parents[counter] |= keys
    for plan, rows in state.old.items():
        for row in rows:
            for i, counter in enumerate(plan.counters):
                parents[counter].add(row._mapping[f"k{i}"])
    for counter, ids in state.copy_parents.items():  # rows found gone (READ COMMITTED)
        parents[counter] |= ids
    colliding: dict[WritePlan, set[Key]] = defaultdict(set)
    by_class: dict[type, list[InstanceState[Any]]] = defaultdict(list)
    for obj in (*session.new, *session.dirty):
        by_class[type(obj)].append(instance_state(obj))
    for cls, states in by_class.items():
        if fk_checks:
            _checked_parents(sa.inspect(cls), states, parents)
        # Plan and attribute keys once per class, then plain loops: flushes can be large.
        child_plan = plan_for(sa.inspect(cls))
        if child_plan is None:
            continue
        fk_keys = _attribute_keys(child_plan.mapper, [c.fk for c in child_plan.counters])
        pk_keys = _attribute_keys(child_plan.mapper, child_plan.pk_columns)
        dicts = [st.dict for st in states]
        for counter, fk_key in zip(child_plan.counters, fk_keys, strict=True):
            values = [None] * len(dicts) if fk_key is None else [d.get(fk_key) for d in dicts]
            parents[counter].update(values)
            if any(v is None for v in values):  # not synced yet: the parent object's key
                for st, value in zip(states, values, strict=True):
                    if value is None:
                        parents[counter].add(_related_key(st, counter.fk))
        names = [k for k in pk_keys if k is not None]
        if len(names) == len(pk_keys):  # new objects with explicit keys (rare: test one first)
            for st, d in zip(states, dicts, strict=True):
                if st.key is None and d.get(names[0]) is not None:
                    key = tuple(d.get(k) for k in names)
                    if all(v is not None for v in key):
                        colliding[child_plan].add(key)
    for counter, keys in _owning_collections(session).items():
        parents[counter] |= keys
    for plan, keys in (after_parents or {}).items():
        at = plan.key_parents()
        assert at is not None
        for counter, i in zip(plan.counters, at, strict=True):
            parents[counter].update(key[i] for key in keys)
    return parents, colliding


def _checked_parents(
    mapper: Mapper[Any], states: list[InstanceState[Any]], parents: dict[Any, set[Any]]
) -> None:
    """Add the parents that ``states``' uncounted foreign keys will check, new or changed ones.

    The many-to-one relationships that sync each key come from
    :func:`.plan.uncounted_parent_fks` (looked up once per mapper, not per object).
    """
    for key, syncs, counter in uncounted_parent_fks(mapper):
        for st in states:
            if st.key is not None and not any(k in st.committed_state for k in (key, *syncs)):
                continue  # persistent, this key unchanged: the UPDATE checks nothing
            value = st.dict.get(key) if key is not None else None
            for rel_key in syncs if value is None else ():  # not synced yet: the object's key
                value = _target_key(st.dict.get(rel_key))
                if value is not None:
                    break
            if value is not None:
                parents[counter].add(value)


def _lock_before_writes(
    session: Session,
    state: _FlushState,
    links: Mapping[Any, set[Any]] | None = None,
    flush_context: UOWTransaction | None = None,
    after_parents: Mapping[WritePlan, set[Key]] | None = None,
) -> None:
    """On InnoDB, take every lock this flush's writes will need: children, parents, natural keys.

    InnoDB has no lock mode like PostgreSQL's ``FOR NO KEY UPDATE``: a child
    INSERT's foreign-key check takes a *shared* lock on the parent, and two
    writers holding it that then both want the exclusive lock for their delta
    deadlock. So before the flush writes, a writer locks, in one global order:

    1. the children it changes or deletes (already read ``FOR UPDATE`` in key
       order by :meth:`_FlushState.capture`), and the existing rows its new
       children's explicit primary keys collide with (an INSERT's
       duplicate-key check would otherwise wait for them while we hold parents);
    2. every parent those rows and the new or moved children name, exclusively,
       by table name and then key (:func:`.deltas.lock_first`).

    ``links``: the parents of association-table rows the flush will write
    (:func:`.association.collection_parents`), locked in the same pass. When
    they are all it locks, of one parent table, the lock is left to the
    flush's first statement, merged with the deltas (:mod:`.link_locks`).

    ``after_parents``: the keys of natural-key rows (:meth:`.WritePlan.key_parents`)
    the flush changes or deletes, not read yet. Their parents, read off the
    keys, are locked in step 2, and the rows after it; new rows under such
    keys are checked for collisions only after it too. Rows first deadlocked
    (docs/databases.md, tests/test_deleted_row_locks.py): a locking read that
    waited for a deleter keeps a lock on the deleted record, which an
    inserter of the key holding the parents then waits for; and a key found
    gone, re-read under its parents, may meanwhile be held by a writer
    waiting for them.

    Parents named only through a persistent parent's one-to-many collection
    are found by :func:`_owning_collections`. Parents found only during the
    flush (keys of parents new in the same flush, which no other transaction
    can see or lock) are locked when the deltas are applied.
    """
    parents, colliding = _flush_parents(session, state, links, after_parents, fk_checks=True)
    locked: dict[WritePlan, set[Key]] = {}
    latest: dict[WritePlan, bool] = {}  # READ COMMITTED (a round trip: once per table)
    for plan, keys in sorted(colliding.items(), key=lambda kv: kv[0].table.name):
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        latest[plan] = innodb.reads_latest(connection)
        if plan.key_parents() is None:
            locked[plan] = _lock_existing(connection, plan, keys)
        else:  # natural keys: checked after the parent lock, with the rows changed
            locked[plan] = set()
    deferrable = (
        links
        and not colliding
        and not after_parents
        and not state.reread
        and flush_context is not None
    )
    if deferrable and association.defer_locks(session, flush_context, parents):
        return  # links only: their first statement locks them (link_locks)
    # Only new children: their INSERTs' foreign-key checks lock the parents first.
    inserts_only = not session.dirty and not session.deleted
    _deltas.lock_first(session, parents, shared_buffered=True, fk_checked=inserts_only)
    for plan, keys in sorted((after_parents or {}).items(), key=lambda kv: kv[0].table.name):
        # Under their parents' locks: a key found gone stays gone until we commit.
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        state.capture(connection, plan, keys)
        if plan in locked:  # rows this flush replaces under a new object's key: not duplicates
            locked[plan] = _keys_of(plan, state.old.get(plan, []))
    # Under the parents' locks, a row re-inserted under a key found gone is
    # either committed (and read now) or waits for this transaction.
    state.reread_vanished(session)
    for plan, keys in sorted(colliding.items(), key=lambda kv: kv[0].table.name):
        if latest[plan]:
            _refuse_late_collisions(session, plan, keys - locked[plan])


def _owning_collections(session: Session) -> dict[Any, set[Any]]:
    """Parents of children added to a persistent parent's one-to-many collection, per counter.

    ``idol.fanships.append(child)`` without a many-to-one on the child leaves
    its FK empty until the unit of work syncs it, mid-flush: without this,
    the parent would be locked only by the child INSERT's foreign-key check,
    after the flush's other parents and out of their key order (a fold,
    which locks in key order, could then deadlock with the writer).
    """
    out: dict[Any, set[Any]] = defaultdict(set)
    for obj in session.dirty:
        st: InstanceState[Any] = instance_state(obj)
        if st.key is None:
            continue
        for key, plans in counted_collections(st.mapper):
            if key not in st.committed_state:
                continue  # not changed since loaded
            added = get_history(obj, key, passive=PASSIVE_NO_INITIALIZE).added
            if not added:
                continue
            rel = st.mapper.relationships[key]
            for plan in plans:
                for counter in plan.counters:
                    for local, remote in rel.synchronize_pairs:
                        if remote is counter.fk:
                            out[counter].add(association.column_value(st, local))
    for found in out.values():
        found.discard(None)
    return out


def _related_key(st: InstanceState[Any], fk: sa.Column[Any]) -> Any:
    """The key of the parent a child points at through foreign key ``fk`` (not synced yet)."""
    for rel in st.mapper.relationships:
        if rel.direction.name == "MANYTOONE" and fk in rel.local_columns:
            key = _target_key(st.dict.get(rel.key))
            if key is not None:
                return key
    return None


def _target_key(target: Any) -> Any:
    """The single-column identity of ``target`` (None: no object, or not persistent yet)."""
    if target is None:
        return None
    identity = sa.inspect(target).identity
    return identity[0] if identity is not None and len(identity) == 1 else None


def _lock_existing(connection: sa.Connection, plan: WritePlan, keys: set[Key]) -> set[Key]:
    """Lock the existing child rows with these keys; probe first, so no gap is locked.

    A locking read of a key that does not exist would lock the gap under
    REPEATABLE READ and make two inserters into it deadlock. The keys
    returned are those the locking read found: a row deleted since the probe
    (and perhaps re-inserted before the parent lock) is left to
    :func:`_refuse_late_collisions`.
    """
    probe = sa.select(*plan.pk_columns).where(innodb.key_match(plan.pk_columns, keys))
    existing = {tuple(row) for row in connection.execute(probe)}
    if not existing:
        return set()
    stmt = (
        sa.select(*plan.pk_columns)
        .with_hint(plan.table, innodb_access.BY_PRIMARY_KEY)
        .where(innodb.key_match(plan.pk_columns, existing))
        .order_by(*plan.pk_columns)
        .with_for_update()
    )
    return {tuple(row) for row in connection.execute(stmt)}


def _refuse_late_collisions(session: Session, plan: WritePlan, keys: set[Key]) -> None:
    """Fail fast, as a duplicate key, if a row with a new child's key appeared while we waited.

    Such a row was committed before our parent lock, and after our locking
    read of colliding rows (:func:`_lock_existing`; natural keys have none). If
    a writer is deleting it, that writer waits for our parents and our INSERT's
    duplicate-key check would wait for it: a deadlock. Since we hold the
    parents, no such delete can commit before our INSERT, so the INSERT is a
    duplicate in any serial order; report it as one without waiting. Only
    under ``READ COMMITTED``, whose plain read shows rows committed since.
    """
    if not keys:
        return
    connection = session.connection(bind_arguments={"mapper": plan.mapper})
    probe = sa.select(*plan.pk_columns).where(innodb.key_match(plan.pk_columns, keys))
    appeared = sorted(tuple(row) for row in connection.execute(probe))
    if appeared:
        raise sa.exc.IntegrityError(
            f"INSERT INTO {plan.table.name}",
            {"key": appeared[0]},
            DuplicateKeyError(
                f"duplicate key {appeared[0]!r} in {plan.table.name}: the row was "
                "committed by another transaction while this flush waited for locks"
            ),
        )


def _collection_changes(st: InstanceState[Any]) -> list[InstanceState[Any]]:
    """Persistent children added to or removed from ``st``'s one-to-many collections.

    The unit of work sets their FK during the flush; reading their old state
    here keeps moves through a collection (``board.pins.append(pin)``) to one
    statement per child table, like FK moves. Unloaded collections are not
    loaded (their history is empty).
    """
    out: list[InstanceState[Any]] = []
    for key, _plans in counted_collections(st.mapper):
        if key not in st.committed_state:
            continue  # not changed since loaded (SQLAlchemy's history reads it from there)
        hist = get_history(st.obj(), key, passive=PASSIVE_NO_INITIALIZE)
        for child in (*hist.added, *hist.deleted):
            child_state: InstanceState[Any] = sa.inspect(child)
            if child_state.key is not None:
                out.append(child_state)
    return out


def _found(target: Any) -> tuple[_FlushState, list[WritePlan], InstanceState[Any]] | None:
    st: InstanceState[Any] = instance_state(target)
    session = st.session
    stash = _stash(session) if session is not None else None
    plans = plans_for(st.mapper)
    if stash is None or not plans or st.key is None:
        return None
    return stash, plans, st


def before_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row whose FK the unit of work itself changes."""
    # Rows changed during the flush in ways before_flush could not see (an FK
    # synced from a relationship without a backref) are read here, one row at
    # a time (rare).
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            if plan.may_change(st):
                stash.capture(connection, plan, {tuple(st.key[1])})


def before_delete(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Read the old state of a row deleted during the flush (cascades) if not read yet."""
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            stash.capture(connection, plan, {tuple(st.key[1])})


def after_insert(mapper: Mapper[Any], connection: sa.Connection, state: Any) -> Any:
    """Note an inserted row: its object, to read its values off, or its key to re-read."""
    # Registered ``raw=True, retval=True`` (events.py): SQLAlchemy passes the
    # InstanceState and calls this without its per-row wrapper. The values
    # are read in after_flush, one pass per counter (plan.inserted_columns):
    # nothing in between changes them but a post_update, whose UPDATE the
    # database holds too.
    session = state.session
    stash = session.info.get(_STASH) if session is not None else None
    if stash is not None:
        for plan in plans_for(state.mapper):
            if plan.direct is not None:
                stash.inserted[plan].append(state)
            else:
                key = mapper.primary_key_from_instance(state.obj())
                stash.touched[plan].add(tuple(key))
    return EXT_CONTINUE


def after_update(mapper: Mapper[Any], connection: sa.Connection, target: Any) -> None:
    """Note an updated row whose old state was read, to re-read it after the flush."""
    # Only rows whose old state was read can have moved a contribution; the
    # ORM calls this hook for every dirty object, even with no net change.
    # (Rows read before the flush are re-read after it in any case; this adds
    # their new key when the primary key itself changed.)
    found = _found(target)
    if found:
        stash, plans, st = found
        assert st.key is not None
        for plan in plans:
            if tuple(st.key[1]) in stash.captured[plan]:
                stash.touched[plan].add(tuple(mapper.primary_key_from_instance(target)))


def after_flush(session: Session, flush_context: UOWTransaction) -> None:
    """Read the new state, and apply new minus old per parent (association rows included)."""
    links = association.end_flush(session)
    stash = session.info.pop(_STASH, None)
    if stash is None:
        return
    stash.unwatch()  # the flush's own statements ran; the deltas' are not its rows'
    deltas = links.deltas if links is not None else _deltas.new_deltas()
    plans = set(stash.captured) | set(stash.touched) | set(stash.inserted)
    for plan in plans:
        connection = session.connection(bind_arguments={"mapper": plan.mapper})
        _deltas.add_rows(deltas, plan, stash.old.get(plan, ()), -1)
        keys = stash.captured.get(plan, set()) | stash.touched.get(plan, set())
        inserted = stash.inserted.get(plan)
        if inserted:
            found, reread = plan.inserted_columns(inserted)
            _deltas.add_columns(deltas, plan, found, +1)
            for st in reread:
                keys.add(tuple(st.mapper.primary_key_from_instance(st.obj())))
        if keys:
            _deltas.add_rows(deltas, plan, _read(connection, plan, keys, lock=False), +1)
    if links is not None and links.recounts:
        # One key-ordered pass for deltas and recounts; the flush's end expires them all.
        _deltas.settle(session, deltas, links.recounts)
        _deltas.schedule_expiry(session, links.recounts)
    else:
        _deltas.apply(session, deltas)


def after_flush_postexec(session: Session, flush_context: UOWTransaction) -> None:
    """Expire the counters of loaded parents, so they read the new values."""
    _deltas.expire_now(session)


def discard(session: Session, *args: Any) -> None:
    """Forget this flush's state (the transaction rolled back)."""
    association.discard(session)
    stash = session.info.pop(_STASH, None)
    if stash is not None:
        stash.unwatch()
    _deltas.forget(session)
