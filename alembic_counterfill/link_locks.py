"""InnoDB: one statement both locks a links-only flush's parents and adds its expected deltas.

A flush that only writes association-table links (``relationship(secondary=…)``
collections) must lock the link parents exclusively, in key order, before its
link INSERT or DELETE (docs/databases.md, "Association tables"), and add the
deltas after it: two statements. When every parent it locks belongs to one
parent table, the delta UPDATE of :func:`.innodb.add_deltas_locking` can do
both at once: it reaches and locks each parent through its primary key in
key order, as the locking read does, and adds the deltas the collections'
histories predict (:func:`.association.collection_parents`). What the link
statements then really write is captured as usual, and only the difference,
actual minus predicted, is applied after the flush: none in the common case,
so the flush costs one statement more than without counters instead of two.
Whatever the prediction got wrong (a link the unit of work skipped, a target
new in the flush, a row written through a backref), the counters stay exact.

The statement runs at the flush's first statement on its connection
(:func:`run_due`, from the association capture's ``before_execute``), not in
``before_flush``: only once the unit of work has begun its transaction does a
failure roll the pre-applied deltas back with everything else. A flush that
ends before writing anything (another ``before_flush`` hook raised, nothing
left to write) never runs it, and then subtracts nothing.
"""

from __future__ import annotations

import weakref
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.state import InstanceState

from . import buffer, innodb
from .counters import Counter, counters_of_table
from .deltas import Deltas, schedule_expiry


@dataclass(eq=False)
class Deferred:
    """The parent locks (with predicted deltas) a links-only flush runs at its first statement."""

    # Weak: an aborted flush leaves this in its connection's capture, whose
    # registry holds connections weakly; the session must stay free to go.
    session: weakref.ref[Session]
    # The flush's UOWTransaction: its ``transaction`` is set once it writes.
    flush_context: weakref.ref[Any]
    # Per parent table, in name order: every parent to lock, with its predicted
    # deltas by counter column (often none).
    tables: list[tuple[sa.Table, sa.Column[Any], dict[Any, dict[sa.Column[Any], int]]]]
    predicted: dict[Counter, Tally[Any]]


def plan(
    session: Session,
    flush_context: Any,
    connection: sa.Connection,
    parents: Mapping[Counter, set[Any]],
    predicted: Mapping[Counter, Tally[Any]],
) -> Deferred | None:
    """The deferred locks of ``parents``, or ``None`` when they need the general pass.

    Only association counters, of parent tables on ``connection`` without
    buffered counters, with integer keys and deltas (the ``JSON_TABLE``
    form), on InnoDB.
    """
    keyed = {c: {x for x in ids if x is not None} for c, ids in parents.items()}
    keyed = {c: ids for c, ids in keyed.items() if ids}
    if not keyed or not innodb.is_innodb(connection.dialect):
        return None
    by_table: dict[sa.Table, tuple[sa.Column[Any], dict[Any, dict[sa.Column[Any], int]]]] = {}
    for counter, ids in keyed.items():
        table, pk = counter.parent_table, counter.parent_pk
        if counter.child_mapper is not None or buffer.deltas_of(table) is not None:
            return None
        if not isinstance(pk.type, sa.Integer) or not all(type(x) is int for x in ids):
            return None
        bind = session.connection(bind_arguments={"mapper": counter.parent_mapper})
        if bind is not connection:
            return None
        deltas = by_table.setdefault(table, (pk, {}))[1]
        for pid in ids:
            deltas.setdefault(pid, {})
    kept: dict[Counter, Tally[Any]] = {}
    for counter, tally in predicted.items():
        if counter not in keyed:
            continue
        deltas = by_table[counter.parent_table][1]
        tally = Tally({pid: n for pid, n in tally.items() if n and pid in deltas})
        if not all(type(n) is int for n in tally.values()):
            return None
        if tally:
            kept[counter] = tally
            for pid, n in tally.items():
                deltas[pid][counter.column] = n
    tables = [(t, *by_table[t]) for t in sorted(by_table, key=lambda t: t.name)]
    return Deferred(weakref.ref(session), weakref.ref(flush_context), tables, kept)


def run_due(connection: sa.Connection, deferred: Deferred, captured: Deltas) -> bool:
    """Run ``deferred`` if the flush has begun writing; then take its prediction off ``captured``.

    Returns whether it ran. ``captured`` is the flush's capture of its link
    statements: the predicted deltas are already in the database, so only
    actual minus predicted remains to apply after the flush.
    """
    session, flush_context = deferred.session(), deferred.flush_context()
    if session is None or getattr(flush_context, "transaction", None) is None:
        return False  # not in the flush's transaction: nothing would roll the deltas back
    for table, pk, deltas in deferred.tables:  # table name order, as every writer locks
        innodb.add_deltas_locking(connection, table, pk, deltas)
    for counter, tally in deferred.predicted.items():
        target = captured[counter.parent_mapper]
        for pid, n in tally.items():
            target[pid][counter] -= n
    # The parents changed even where the correction turns out to be zero.
    schedule_expiry(session, {c: set(t) for c, t in deferred.predicted.items()})
    return True


# --- The prediction, from the collections' histories (association.collection_parents) ---

#: A counter of a link table as one relationship writes it: the owner's column
#: naming its parent (or None), the target's (or None), whether it is predictable.
Side = tuple[Counter, Any, Any, bool]


def link_sides(mapper: Mapper[Any]) -> list[tuple[Any, list[Side]]]:
    """``mapper``'s writable relationships over counted link tables, with their counters' sides."""
    found: list[tuple[Any, list[Side]]] = []
    for rel in mapper.relationships:
        if rel.secondary is None or rel.viewonly:
            continue
        sides: list[Side] = []
        for counter in counters_of_table(rel.secondary):
            local = next((c for c, link in rel.synchronize_pairs if link is counter.fk), None)
            pairs = rel.secondary_synchronize_pairs or ()
            remote = next((c for c, link in pairs if link is counter.fk), None)
            if local is not None or remote is not None:
                sides.append((counter, local, remote, predictable(counter)))
        if sides:
            found.append((rel, sides))
    return found


def predictable(counter: Counter) -> bool:
    """Whether a link row adds exactly one to ``counter`` (a plain count, applied in place)."""
    return counter.where is None and counter.summed is None and not buffer.is_buffered(counter)


def first_seen(
    st: InstanceState[Any],
    rel: Any,
    targets: list[InstanceState[Any]],
    added: int,
    seen: set[Any],
) -> tuple[list[InstanceState[Any]], int]:
    """The ``targets`` whose link row no other collection of this flush named (and how many added).

    ``a.following.append(b)`` shows in ``b.followers`` too when that backref
    is loaded; the unit of work writes the row once, so it is predicted once.
    """
    own = tuple(link.key for _, link in rel.synchronize_pairs)
    other = tuple(link.key for _, link in rel.secondary_synchronize_pairs or ())
    kept: list[InstanceState[Any]] = []
    kept_added = 0
    for i, t in enumerate(targets):
        is_added = i < added
        row = (rel.secondary, is_added, frozenset(((own, id(st)), (other, id(t)))))
        if row in seen:
            continue
        seen.add(row)
        kept.append(t)
        kept_added += is_added
    return kept, kept_added
