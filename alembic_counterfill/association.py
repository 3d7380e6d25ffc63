"""Live maintenance for plain association tables (``relationship(secondary=...)``).

The unit of work writes association rows with ``Connection.execute`` from its
many-to-many dependency processor: no mapper event or ``do_orm_execute`` sees
them. A flush therefore opens a :class:`Capture` on its connections; a
``before_execute``/``after_execute`` pair on every engine notices the INSERT,
DELETE and UPDATE statements on counted association tables that run on a
captured connection and turns what they really wrote into deltas:

- INSERT: each parameter row adds its contribution (plain counts and sums
  whose value the row carries); ``where=``, and values only the database knows,
  recount the touched parents exactly instead;
- DELETE and UPDATE: the matching rows are read first, locked ``FOR UPDATE``
  in key order, so a concurrent writer cannot change them before the
  statement; the delta is minus what those rows counted as. When the real
  rowcount disagrees (a row committed after the read, on a table without a
  primary key to restrict by) the touched parents are recounted, so a stale
  double remove can never decrement twice. UPDATE always recounts.

``Session.execute`` of a statement on a counted association table opens a
capture for that one statement (:func:`run_statement`). A flush's deltas are
applied by :mod:`.flush` together with every other counter of the flush
(:func:`.deltas.settle`), parents locked in key order. The hooks are
registered by :mod:`.events`.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Result
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.attributes import PASSIVE_NO_INITIALIZE, get_history, instance_state
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql import operators

from . import buffer, innodb, innodb_access, link_locks, sql
from .counters import Counter, association_tables, counters_of_table
from .deltas import Deltas, Recounts, lock_first, new_deltas, settle, totals
from .errors import CounterfillWarning

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Capture:
    """Deltas and recounts collected from the association-table statements of one flush."""

    deltas: Deltas = field(default_factory=new_deltas)
    recounts: Recounts = field(default_factory=lambda: defaultdict(set))
    # Rows read by before_execute, popped by the matching after_execute.
    pending: list[tuple[Any, list[Any]]] = field(default_factory=list)
    # InnoDB: the parent lock a links-only flush takes at its first statement.
    deferred: link_locks.Deferred | None = None

    def add(self, counters: Sequence[Counter], rows: Iterable[Any], sign: int) -> None:
        """Add ``sign`` times each ``(k0, v0, k1, v1 ...)`` row to the deltas."""
        for row in rows:
            for i, counter in enumerate(counters):
                parent, value = row[2 * i], row[2 * i + 1]
                if parent is not None and value:
                    self.deltas[counter.parent_mapper][parent][counter] += sign * value

    def recount(self, counters: Sequence[Counter], rows: Iterable[Any]) -> None:
        """Recount the parents each ``(k0, v0, k1, v1 ...)`` row belongs to."""
        for row in rows:
            for i, counter in enumerate(counters):
                if row[2 * i] is not None:
                    self.recounts[counter].add(row[2 * i])


_captures: weakref.WeakKeyDictionary[sa.Connection, Capture] = weakref.WeakKeyDictionary()


def open_capture(connection: sa.Connection) -> Capture:
    """Start collecting association-table writes made on ``connection`` (afresh)."""
    capture = _captures[connection] = Capture()
    return capture


def close_capture(connection: sa.Connection) -> Capture | None:
    """Stop collecting on ``connection`` and return what was collected."""
    return _captures.pop(connection, None)


def _counted(elem: Any) -> list[Counter] | None:
    if not getattr(elem, "is_dml", False):
        return None
    table = getattr(elem, "table", None)
    if not isinstance(table, sa.Table):
        return None
    return counters_of_table(table) or None


def _rows_of(multiparams: Any, params: Any) -> list[dict[str, Any]]:
    if multiparams:
        return list(multiparams)
    return [params] if params else []


def _unit_of_work_keys(elem: Any, rows: list[dict[str, Any]]) -> list[sa.Column[Any]] | None:
    """The columns of a ``col = :col AND ...`` WHERE (the unit of work's DELETE), else None."""
    where = elem.whereclause
    if where is None or not rows:
        return None
    terms = list(where.clauses) if isinstance(where, sa.BooleanClauseList) else [where]
    cols: list[sa.Column[Any]] = []
    for term in terms:
        left, right = getattr(term, "left", None), getattr(term, "right", None)
        if getattr(term, "operator", None) is not sa.sql.operators.eq:
            return None
        if not isinstance(left, sa.Column) or not isinstance(right, sa.BindParameter):
            return None
        if right.key != left.key or left.table is not elem.table:
            return None
        cols.append(left)
    if not all(all(c.key in row for c in cols) for row in rows):
        return None
    return cols


def _read_matching(
    conn: sa.Connection,
    elem: Any,
    counters: Sequence[Counter],
    rows: list[dict[str, Any]],
    hint: str | None,
) -> list[Any]:
    """Lock and read what each row the statement matches counts as, in key order.

    ``hint``: the index of a keyless table on InnoDB (:func:`.innodb_access.keyless_access`).
    """
    keys = _unit_of_work_keys(elem, rows)
    if keys is not None:
        # One statement for the whole executemany: the rows named by their keys.
        values = sorted({tuple(r[c.key] for c in keys) for r in rows}, key=repr)
        found: list[Any] = []
        for i in range(0, len(values), 500):
            stmt = sql.matching_links(counters, _among(conn, keys, values[i : i + 500]))
            if hint is not None:
                stmt = stmt.with_hint(elem.table, hint)
            found.extend(conn.execute(stmt).all())
        return found
    stmt = sql.matching_links(counters, elem.whereclause)
    if hint is not None:
        stmt = stmt.with_hint(elem.table, hint)
    if not rows:
        return list(conn.execute(stmt).all())
    found = []
    for row in rows:  # a hand-written executemany: rare, read per parameter set
        found.extend(conn.execute(stmt, row).all())
    return found


def _among(conn: sa.Connection, columns: Sequence[Any], values: Sequence[Any]) -> Any:
    """``(columns) IN (values)``; on InnoDB an OR of key equalities (a range per key).

    MariaDB answers a row-constructor ``IN`` with a scan, which under a lock
    (the locking read, the DELETE restricted to its rows) locks every row of
    the table, other writers' included, out of key order.
    """
    if innodb.is_innodb(conn.dialect):
        return innodb.key_match(columns, values)
    return sql.among(columns, values)


def before_execute(
    conn: sa.Connection, elem: Any, multiparams: Any, params: Any, options: Any
) -> tuple[Any, Any, Any]:
    """Before a DELETE/UPDATE of a counted association table: lock and read its rows.

    Registered with ``retval=True``: a single-statement DELETE/UPDATE on a
    table with a primary key comes back restricted to the rows it locked. On
    InnoDB, statements naming the rows of a table without one by all their
    columns (the unit of work's) read, update and delete them (the link
    DELETE as one statement) through one index (:func:`.innodb_access.keyless_access`).
    """
    capture = _captures.get(conn) if _captures else None
    if capture is None:
        return elem, multiparams, params
    deferred = capture.deferred
    if deferred is not None:
        capture.deferred = None  # its own statement comes back through here
        if not link_locks.run_due(conn, deferred, capture.deltas):
            capture.deferred = deferred
    counters = _counted(elem)
    if counters is None or isinstance(elem, sa.Insert):
        return elem, multiparams, params
    rows = _rows_of(multiparams, params)
    keys = _unit_of_work_keys(elem, rows)
    hint = None
    if keys is not None and innodb.is_innodb(conn.dialect):
        hint = innodb_access.keyless_access(conn, elem.table, counters, keys)
    old = _read_matching(conn, elem, counters, rows, hint)
    pk = list(elem.table.primary_key.columns)
    single = not multiparams
    if (
        hint is not None
        and keys is not None
        and isinstance(elem, sa.Delete)
        and not elem._returning
    ):
        # The unit of work's link DELETE, through the same index as the read,
        # as one statement: a single-table DELETE takes no index hint.
        values = sorted({tuple(r[c.key] for c in keys) for r in rows}, key=repr)
        through = innodb_access.delete_through_keys(elem, keys, values, hint=hint)
        if through is not None:
            capture.pending.append((through, old))
            return through, [], {}
    if hint is not None and isinstance(elem, sa.Update):
        elem = elem.with_hint(hint, dialect_name=conn.dialect.name)
    if single and pk and conn.dialect.name != "sqlite" and not elem._returning:
        # Restrict a hand-written statement to the rows just locked: a row
        # committed after the read cannot be changed unseen.
        n = 2 * len(counters)
        elem = elem.where(_among(conn, pk, [tuple(r[n:]) for r in old]))
    capture.pending.append((elem, old))
    return elem, multiparams, params


def after_execute(
    conn: sa.Connection, elem: Any, multiparams: Any, params: Any, options: Any, result: Any
) -> None:
    """After a write to a counted association table: turn what it wrote into deltas."""
    capture = _captures.get(conn) if _captures else None
    if capture is None:
        return
    counters = _counted(elem)
    if counters is None:
        return
    rows = _rows_of(multiparams, params)
    if isinstance(elem, sa.Insert):
        _inserted(conn, capture, elem, counters, rows)
        return
    pending = capture.pending.pop() if capture.pending else None
    if pending is None or pending[0] is not elem:
        log.warning("counterfill: lost track of a statement on %s; run verify", elem.table.name)
        return
    old = pending[1]
    rowcount = getattr(result, "rowcount", -1)
    if isinstance(elem, sa.Delete) and rowcount in (-1, None, len(old)):
        capture.add(counters, old, -1)
        return
    # An UPDATE, or a DELETE that met rows it did not read: recount every parent involved.
    capture.recount(counters, old)
    for counter in counters:
        capture.recounts[counter] |= {r[counter.fk.key] for r in rows if counter.fk.key in r}
        for key, value in (getattr(elem, "_values", None) or {}).items():
            if getattr(key, "key", key) == counter.fk.key:
                if isinstance(value, sa.BindParameter) and value.callable is None:
                    capture.recounts[counter].add(value.value)
                else:
                    _lost(elem, counter)
    table: sa.Table = elem.table
    if isinstance(elem, sa.Delete) and rowcount > len(old):  # only when it was not restricted
        log.warning(
            "counterfill: DELETE on %s removed %d row(s) committed after they were read; "
            "their parents' counters may be off until `alembic counterfill verify --fix`",
            table.name,
            rowcount - len(old),
        )


def _lost(elem: Any, counter: Counter) -> None:
    log.warning(
        "counterfill: %s on %s sets %s to a value only the database knows; "
        "run `alembic counterfill verify --fix`",
        type(elem).__name__.upper(),
        elem.table.name,
        counter.key,
    )


def _default(column: sa.Column[Any]) -> Any:
    default = column.default
    if default is None:
        return None if column.server_default is None else _UNKNOWN
    return default.arg if getattr(default, "is_scalar", False) else _UNKNOWN  # type: ignore[attr-defined]


_UNKNOWN: Any = object()


def _value(row: dict[str, Any], column: sa.Column[Any], keys: Any) -> Any:
    # An executemany is compiled for the first row's keys: others' extra keys are ignored.
    if column.key in keys:
        v = row[column.key]
        if isinstance(v, sa.BindParameter) and v.callable is None:
            return v.value
        return _UNKNOWN if isinstance(v, sa.ClauseElement) else v
    return _default(column)


def _insert_rows(elem: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows an INSERT writes: its parameter sets with its ``values()`` merged in."""
    fixed = {getattr(k, "key", k): v for k, v in (elem._values or {}).items()}
    if elem._multi_values:
        names = [c.key for c in elem.table.columns]
        return [
            {**fixed, **(r if isinstance(r, dict) else dict(zip(names, r, strict=False)))}
            for batch in elem._multi_values
            for r in batch
        ]
    if fixed:
        return [{**fixed, **r} for r in rows] or [fixed]
    return rows


def _lock_insert_parents(
    session: Session, dml: Any, counters: Sequence[Counter], params: Any
) -> None:
    """On InnoDB, lock the parents an INSERT names before it runs: its FK checks share them."""
    rows = _insert_rows(dml, _rows_of(params if isinstance(params, list) else None, params))
    names = set(rows[0]) if rows else set()
    parents: dict[Counter, set[Any]] = defaultdict(set)
    for counter in counters:
        for row in rows:
            value = _value(row, counter.fk, names)
            if value is not None and value is not _UNKNOWN:
                parents[counter].add(value)
    lock_first(session, parents)


def _lock_matching_parents(
    session: Session, conn: sa.Connection, dml: Any, counters: Sequence[Counter], params: Any
) -> None:
    """On InnoDB, lock the parents of the rows a DELETE/UPDATE matches before it locks them.

    A plain read (under ``READ COMMITTED``, the latest committed rows) names
    them. Association rows are locked after their parents by every writer:
    a locking read also locks a deleted row not yet purged, and an inserter
    of the same key, holding the parents, would wait for it while its
    holder waits for those parents.
    """
    sets = _rows_of(params if isinstance(params, list) else None, params)
    parents = _named_parents(dml.whereclause, counters, sets or [{}])
    if parents is None:
        # The WHERE does not name every counted column's values: read them.
        # A row committed after this read is locked before its parents.
        parents = defaultdict(set)
        stmt = sql.matching_links(counters, dml.whereclause, lock=False)
        for one in sets or [{}]:  # a hand-written executemany: rare, a read per parameter set
            for row in conn.execute(stmt, one):
                for i, counter in enumerate(counters):
                    if row[2 * i] is not None:
                        parents[counter].add(row[2 * i])
    lock_first(session, parents)


def _named_parents(
    where: Any, counters: Sequence[Counter], sets: list[dict[str, Any]]
) -> dict[Counter, set[Any]] | None:
    """Parents a WHERE names by ``fk = :v`` / ``fk IN (:v)`` terms ANDed together, per counter.

    ``None`` unless every counter's column is named so: then any row the
    statement matches, committed now or later, belongs to these parents.
    """
    if where is None:
        return None
    is_and = isinstance(where, sa.BooleanClauseList) and where.operator is operators.and_
    terms = list(where.clauses) if is_and else [where]
    out: dict[Counter, set[Any]] = {}
    for counter in counters:
        for term in terms:
            right = getattr(term, "right", None)
            if getattr(term, "left", None) is not counter.fk or not isinstance(
                right, sa.BindParameter
            ):
                continue
            if right.callable is not None:
                continue
            values = [one.get(right.key, right.value) for one in sets]
            if term.operator is operators.eq:
                out[counter] = {v for v in values if v is not None}
            elif term.operator is operators.in_op and right.expanding:
                out[counter] = {v for vs in values for v in (vs or ()) if v is not None}
            else:
                continue
            break
        if counter not in out:
            return None
    return out


def _inserted(
    conn: sa.Connection,
    capture: Capture,
    elem: Any,
    counters: Sequence[Counter],
    rows: list[dict[str, Any]],
) -> None:
    if elem.select is not None:
        for counter in counters:
            _lost(elem, counter)  # Session.execute handles these before they get here
        return
    # An upsert may insert nothing, or update a row: recount instead of adding.
    upsert = sql.may_skip_or_update(elem)
    rows = _insert_rows(elem, rows)
    keys = set(rows[0]) if rows else set()
    # Only buffered counters read their rows back (a walk over every row's key).
    plain = not upsert and not elem._prefixes and any(buffer.is_buffered(c) for c in counters)
    inserted = _inserted_keys(elem.table, rows, keys) if plain else None
    read_back: list[Counter] = []
    for counter in counters:
        per_parent = capture.deltas[counter.parent_mapper]
        exact = counter.where is None and not upsert
        if exact and _add_plain(per_parent, counter, rows, keys):
            continue
        for row in rows:
            parent = _value(row, counter.fk, keys)
            if parent is _UNKNOWN:
                _lost(elem, counter)
                break
            if parent is None:
                continue
            value = 1 if counter.summed is None else _value(row, counter.summed, keys)
            if exact and value is not _UNKNOWN:
                if value:
                    per_parent[parent][counter] += value
            elif inserted is not None and buffer.is_buffered(counter):
                read_back.append(counter)
                break
            else:
                capture.recounts[counter].add(parent)
    if read_back and inserted:
        # A buffered counter's parent is a hot one: a recount would lock it
        # exclusively. The rows this statement just inserted are this
        # transaction's own (locked until it ends), so what they count as,
        # read back by key, is an exact delta for the deltas table.
        for i in range(0, len(inserted), 500):
            stmt = sql.matching_links(
                read_back, sql.among(_primary_key(elem.table), inserted[i : i + 500]), lock=False
            )
            capture.add(read_back, conn.execute(stmt).all(), +1)


def _primary_key(table: sa.Table) -> list[sa.Column[Any]]:
    return list(table.primary_key.columns)


def _inserted_keys(
    table: sa.Table, rows: list[dict[str, Any]], keys: Any
) -> list[tuple[Any, ...]] | None:
    """The primary keys of the rows a plain INSERT wrote, when every row names its own."""
    pk = _primary_key(table)
    if not pk or not rows:
        return None
    found = []
    for row in rows:
        key = tuple(_value(row, c, keys) for c in pk)
        if any(v is None or v is _UNKNOWN for v in key):
            return None
        found.append(key)
    return found


def collection_parents(session: Session) -> dict[Counter, set[Any]]:
    """Parents the flush's association-table writes will count for, from collection history.

    For each pending change of a ``secondary`` collection, and each loaded
    collection of an object the flush deletes, the keys its link rows name on
    each side that are already known (persistent objects). On InnoDB
    :mod:`.flush` locks them with the flush's other parents, up front and in
    one key order (buffered counters' parents shared, others exclusive);
    otherwise the link INSERT's foreign-key check would take shared locks in
    the unit of work's order and a writer could wait for a fold while
    holding a parent the fold wants next. An object new in this flush has
    no key yet (no fold can know it either); the links of a deleted object's
    unloaded collection are found by the unit of work during the flush.

    It also notes, for :func:`defer_locks`, the deltas those histories predict
    for plain counts (the unit of work's link rows, a backref's named once).
    """
    out: dict[Counter, set[Any]] = defaultdict(set)
    session.info.pop(_PREDICTED, None)
    if not _secondary_parents:
        return out
    # Per counter, the values of every added and removed link, tallied once at
    # the end (in C) instead of one Counter update per collection.
    plus_of: dict[Counter, list[Any]] = defaultdict(list)
    minus_of: dict[Counter, list[Any]] = defaultdict(list)
    owners: dict[Counter, Tally[Any]] = defaultdict(Tally)  # the owner's side, per collection
    seen: set[Any] = set()  # link rows already predicted through another collection
    deleted = session.deleted
    innodb_of: dict[Mapper[Any], bool] = {}  # per mapper, not per object: flushes can be large
    sides_of: dict[Mapper[Any], list[tuple[Any, list[link_locks.Side]]]] = {}
    looked_up: dict[tuple[Mapper[Any], Any], tuple[str | None, int | None]] = {}
    for obj in (*session.new, *session.dirty, *deleted):
        st: InstanceState[Any] = instance_state(obj)
        mapper = st.mapper
        if mapper not in _secondary_parents:
            continue
        if mapper not in innodb_of:
            # Elsewhere the deltas lock the parents afterwards: nothing to name up front.
            innodb_of[mapper] = innodb.is_innodb(session.get_bind(mapper=mapper).dialect)
        if not innodb_of[mapper]:
            continue
        if mapper not in sides_of:
            sides_of[mapper] = link_locks.link_sides(mapper)
        gone = obj in deleted
        committed = st.committed_state
        for rel, sides in sides_of[mapper]:
            added: int | None = None  # how many of the items are added (None: no prediction)
            if gone:  # its links go with it: those of a loaded collection
                members = st.dict.get(rel.key)
                items = [] if members is None else list(members)
            elif rel.key not in committed:
                # A collection changed since it was loaded keeps its original
                # there (SQLAlchemy's history reads it): no entry, no history.
                continue
            else:
                # Not ``st.attrs``: a state's first ``attrs`` builds an AttributeState
                # per attribute, and every flush's objects are new states.
                hist = get_history(obj, rel.key, passive=PASSIVE_NO_INITIALIZE)
                items = [*hist.added, *hist.deleted]
                added = len(hist.added)
            if not items:
                continue
            targets = [instance_state(t) for t in items]
            guessed, new = targets, added
            if added is not None and rel.secondary in _shared_tables:
                guessed, new = link_locks.first_seen(st, rel, targets, added, seen)
            values: dict[Any, list[Any]] = {}  # per remote column, of every target
            for counter, local, remote, predictable in sides:
                guess = new is not None and predictable
                if local is not None and st.key is not None:
                    value = column_value(st, local)
                    out[counter].add(value)
                    if guess and new is not None:
                        owners[counter][value] += 2 * new - len(guessed)
                if remote is None:
                    continue
                if remote not in values:
                    values[remote] = _target_values(targets, remote, looked_up)
                out[counter].update(values[remote])
                if not guess or new is None:
                    continue
                found = values[remote]
                if guessed is not targets:
                    found = _target_values(guessed, remote, looked_up)
                plus_of[counter].extend(found[:new])
                minus_of[counter].extend(found[new:])
    for found_ in out.values():
        found_.discard(None)
    predicted: dict[Counter, Tally[Any]] = {}
    for counter in {*owners, *plus_of}:
        tally = Tally(plus_of.get(counter, ()))
        tally.subtract(Tally(minus_of.get(counter, ())))  # per distinct parent, not per link
        tally.update(owners.get(counter, ()))
        tally.pop(None, None)  # a target new in this flush: no key to lock or predict
        predicted[counter] = tally
    if predicted:
        session.info[_PREDICTED] = predicted
    return out


_PREDICTED = "counterfill.links_predicted"


def defer_locks(session: Session, flush_context: Any, parents: Mapping[Counter, set[Any]]) -> bool:
    """On InnoDB, leave a links-only flush's parent lock to its first statement (link_locks).

    ``parents``: every parent the flush must lock before it writes. Returns
    whether the lock was deferred; if not, the caller locks them now.
    """
    predicted = session.info.pop(_PREDICTED, None) or {}
    conns = session.info.get(_OPEN) or []
    if len(conns) != 1:  # one connection writes every link and parent
        return False
    conn = conns[0]
    capture = _captures.get(conn)
    if capture is None:
        return False
    deferred = link_locks.plan(session, flush_context, conn, parents, predicted)
    if deferred is None:
        return False
    capture.deferred = deferred
    return True


def _target_values(
    targets: list[InstanceState[Any]],
    column: Any,
    looked_up: dict[tuple[Mapper[Any], Any], tuple[str | None, int | None]],
) -> list[Any]:
    """``column``'s value of each target (``None`` for one new in this flush), one per target.

    ``looked_up``: the attribute of each (mapper, column), shared by the calls of one flush.
    """
    found: list[Any] = []
    mapper: Any = None
    key: str | None = None
    index: int | None = None
    for t in targets:
        identity = t.key
        if identity is None:  # new in this flush: no other transaction can lock it
            found.append(None)
            continue
        if t.mapper is not mapper:  # targets mostly share one mapper
            mapper = t.mapper
            where = looked_up.get((mapper, column))
            if where is None:
                where = looked_up[(mapper, column)] = _attribute_of(mapper, column)
            key, index = where
        if index is not None and key not in t.committed_state:
            # A key attribute not changed since it was loaded: the identity
            # has its value (``InstanceState.dict`` costs a weakref call).
            found.append(identity[1][index])
            continue
        value = t.dict.get(key) if key is not None else None
        if value is None and index is not None:
            value = identity[1][index]  # an expired key attribute: the identity has it
        found.append(value)
    return found


def _add_plain(
    per_parent: Any, counter: Counter, rows: list[dict[str, Any]], keys: set[str]
) -> bool:
    """Add the rows' contributions when every row carries plain values; False if one does not.

    The unit of work's executemany of association rows (1,000 links in a
    flush): one pass per column, tallied per parent, instead of one
    :func:`_value` call per row and counter.
    """
    fk = counter.fk.key
    if fk not in keys:
        return False
    parents = list(map(itemgetter(fk), rows))
    if _any_clause(parents):
        return False
    values = None
    if counter.summed is not None:
        summed = counter.summed.key
        if summed not in keys:
            return False
        values = list(map(itemgetter(summed), rows))
        if _any_clause(values):
            return False
    for parent, total in totals(parents, values).items():
        per_parent[parent][counter] += total
    return True


def _any_clause(values: list[Any]) -> bool:
    """Whether one of ``values`` is a SQL expression (checked per type: rows share a few)."""
    return any(issubclass(t, sa.ClauseElement) for t in set(map(type, values)))


# --- InnoDB: locks before the writes ------------------------------------------------------


@lru_cache(maxsize=1024)
def _attribute_of(mapper: Mapper[Any], column: Any) -> tuple[str | None, int | None]:
    """The attribute key mapping ``column`` on ``mapper`` and its place in the identity key."""
    try:
        key: str | None = mapper.get_property_by_column(column).key
    except Exception:  # an unmapped column: nothing in the session can name it
        key = None
    index = next((i for i, col in enumerate(mapper.primary_key) if col is column), None)
    return key, index


def column_value(st: InstanceState[Any], column: Any) -> Any:
    """``st``'s value for ``column`` without loading anything (``None``: not known yet)."""
    key, index = _attribute_of(st.mapper, column)
    value = st.dict.get(key) if key is not None else None
    if value is None and index is not None and st.key is not None:
        return st.key[1][index]  # an expired key attribute: the identity has it
    return value


# --- Flushes and Session.execute -------------------------------------------------------------


def begin_flush(session: Session) -> None:
    """Open captures on the connections a flush may write association rows with."""
    # A flush with nothing to write never reaches after_flush: drop what it opened.
    discard(session)
    if not _secondary_parents:
        return
    opened: list[sa.Connection] = []
    for mapper in list(_secondary_parents):
        try:
            conn = session.connection(bind_arguments={"mapper": mapper})
        except sa.exc.UnboundExecutionError:  # a mapper this session has no bind for
            continue
        if not any(conn is c for c in opened):
            open_capture(conn)
            opened.append(conn)
    session.info[_OPEN] = opened


def end_flush(session: Session) -> Capture | None:
    """Close the flush's captures and merge them (``None`` when nothing was captured)."""
    conns = session.info.pop(_OPEN, None)
    if not conns:
        return None
    merged: Capture | None = None
    for conn in conns:
        capture = close_capture(conn)
        if capture is None:
            continue
        if merged is None:
            merged = capture
            continue
        for mapper, per in capture.deltas.items():
            for pid, ds in per.items():
                for counter, d in ds.items():
                    merged.deltas[mapper][pid][counter] += d
        for counter, ids in capture.recounts.items():
            merged.recounts[counter] |= ids
    return merged


def discard(session: Session) -> None:
    """Drop the captures of a flush that failed or was rolled back."""
    session.info.pop(_PREDICTED, None)
    for conn in session.info.pop(_OPEN, None) or ():
        close_capture(conn)


_OPEN = "counterfill.secondary"


def handles(dml: Any) -> bool:
    """Whether ``dml`` writes a counted association table."""
    return _counted(dml) is not None


def run_statement(state: ORMExecuteState, dml: Any) -> Result[Any]:
    """Run a ``Session.execute`` statement on a counted association table; keep counters exact."""
    session = state.session
    counters = _counted(dml) or []
    conn = session.connection(bind_arguments=state.bind_arguments)
    if isinstance(dml, sa.Insert) and dml.select is not None:
        # INSERT … FROM SELECT: recount the parents the SELECT names.
        capture = Capture()
        names = list(dml._select_names or ())
        sub = dml.select.subquery()
        params = state.parameters if isinstance(state.parameters, dict) else None
        for counter in counters:
            if counter.fk.key in names:
                col = list(sub.c)[names.index(counter.fk.key)]
                found = session.execute(sa.select(col).distinct(), params)
                capture.recounts[counter] |= {r[0] for r in found}
            elif _default(counter.fk) is _UNKNOWN:
                _lost(dml, counter)
            elif _default(counter.fk) is not None:
                capture.recounts[counter].add(_default(counter.fk))
        result = state.invoke_statement()
    else:
        if isinstance(dml, sa.Insert) and innodb.is_innodb(conn.dialect):
            _lock_insert_parents(session, dml, counters, state.parameters)
        elif innodb.is_innodb(conn.dialect) and innodb.reads_latest(conn):
            _lock_matching_parents(session, conn, dml, counters, state.parameters)
        capture = open_capture(conn)
        try:
            result = state.invoke_statement()
        finally:
            close_capture(conn)
    settle(session, capture.deltas, capture.recounts)
    return result


# --- Mapper configuration ---------------------------------------------------------------------

# Parent mappers of writable relationships over counted association tables
# (weak: a disposed registry's mappers must be free to go).
_secondary_parents: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


# Counted association tables that more than one relationship writes (a backref pair).
_shared_tables: weakref.WeakSet[sa.Table] = weakref.WeakSet()


def after_configured() -> None:
    """Find the relationships that write counted association tables; warn about DB cascades."""
    tables = set(association_tables())
    writers: dict[sa.Table, set[Any]] = defaultdict(set)
    for table in tables:
        for counter in counters_of_table(table):
            for mapper in counter.parent_mapper.registry.mappers:
                for rel in mapper.relationships:
                    if rel.secondary in tables and not rel.viewonly:
                        _secondary_parents.add(rel.parent)
                        writers[rel.secondary].add(rel)
                        _check_cascade(rel)
    for table, rels in writers.items():
        if len(rels) > 1:
            _shared_tables.add(table)


_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def _check_cascade(rel: Any) -> None:
    """Warn when the database, not the ORM, deletes a counted association table's rows."""
    if not rel.passive_deletes or rel in _warned:
        return
    table = rel.secondary
    for fk in table.foreign_keys:
        cascades = (fk.ondelete or "").upper() == "CASCADE"
        if cascades and fk.references(rel.parent.local_table):
            _warned.add(rel)
            warnings.warn(
                f"{rel}: passive_deletes=True leaves deleting {table.name} rows to the "
                f"database's ON DELETE CASCADE, which counters cannot see; drop "
                "passive_deletes on this relationship, or run `alembic counterfill verify --fix` "
                "after deletes",
                CounterfillWarning,
                stacklevel=2,
            )
            return
