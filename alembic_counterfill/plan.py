"""The write plan of a child mapper: which counters its rows feed and how to read what a row counts.

Every write path (flush, bulk INSERT, bulk UPDATE/DELETE) asks :func:`plan_for`
(or :func:`plan_for_statement`) first; ``None`` means the write touches no
counter. Not to be confused with :class:`.planning.BackfillPlan`, a backfill's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, configure_mappers
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.state import InstanceState

from .counters import Counter, child_mappers, counters_of_child

#: A child row's primary key, as a tuple (composite keys included).
Key = tuple[Any, ...]


@dataclass(eq=False)
class WritePlan:
    """How one child table's rows feed their counters, and which writes can move them.

    Rows read with :func:`.sql.row_state` carry ``p<j>`` (the child's key),
    then ``k<i>``/``v<i>`` (parent key and contribution) per counter ``i``.
    """

    mapper: Mapper[Any]
    table: sa.Table
    counters: list[Counter]
    pk_columns: list[sa.Column[Any]]
    # Attribute keys whose change can move a contribution; None means "any change may".
    watched: frozenset[str] | None
    # ``watched`` plus the keys and names of their columns (what a statement may name).
    watched_names: frozenset[str] | None
    # Per counter (fk attribute, summed attribute or None) when every counter's
    # contribution can be read off an inserted object; None when a where= needs SQL.
    direct: list[tuple[str, str | None, type]] | None

    def inserted_columns(
        self, states: Sequence[InstanceState[Any]]
    ) -> tuple[list[tuple[list[Any], list[Any] | None]], list[InstanceState[Any]]]:
        """What just-inserted objects contribute, read off the objects, and those to re-read.

        Returns, per counter, the parent keys and the contributions (``None``:
        1 each, a count) of the objects whose values are all known, and the
        objects whose values only the database knows (a server-side default,
        or a value of another type that the database coerces). One pass per
        counter over the objects, not one call per object: flushes insert
        thousands of rows.
        """
        assert self.direct is not None
        dicts = [st.dict for st in states]
        bad: set[int] = set()
        found: list[tuple[list[Any], list[Any] | None]] = []
        for fk_attr, sum_attr, fk_type in self.direct:
            pids = [d.get(fk_attr, _MISSING) for d in dicts]
            bad.update(
                i
                for i, p in enumerate(pids)
                if type(p) is not fk_type
                and (p is _MISSING or (p is not None and not isinstance(p, fk_type)))
            )
            values = None
            if sum_attr is not None:
                values = [d.get(sum_attr, _MISSING) for d in dicts]
                bad.update(i for i, v in enumerate(values) if v is _MISSING)
            found.append((pids, values))
        if not bad:
            return found, []
        keep = [i for i in range(len(dicts)) if i not in bad]
        out = [
            ([pids[i] for i in keep], None if values is None else [values[i] for i in keep])
            for pids, values in found
        ]
        return out, [states[i] for i in sorted(bad)]

    def key_parents(self) -> list[int] | None:
        """Where each counter's foreign key sits in the primary key (None: not all of them do).

        A natural key (``Follow(follower_id, followed_id)``) names every parent
        its row counts toward: a row under that key can only ever count toward
        those parents, whoever inserted it, so on InnoDB every writer locks
        them before the row (docs/databases.md, tests/test_deleted_row_locks.py).
        """
        out = []
        for counter in self.counters:
            at = [i for i, col in enumerate(self.pk_columns) if col is counter.fk]
            if not at:
                return None
            out.append(at[0])
        return out

    def may_change(self, state: InstanceState[Any]) -> bool:
        """Whether a dirty object's pending changes can move one of its contributions."""
        if self.watched is None:
            return True
        attrs = state.attrs
        return any(attrs[k].history.has_changes() for k in self.watched)


#: A value the object does not hold (a column the database fills in).
_MISSING: Any = object()

_plans: dict[Mapper[Any], list[WritePlan]] = {}


def _relationship_keys(mapper: Mapper[Any], columns: set[sa.Column[Any]]) -> set[str]:
    """Many-to-one relationships that set one of ``columns`` (``pin.board = other``).

    Watching them lets the flush read the old state of rows moved through a
    relationship in its one batched statement, like FK moves, instead of one
    row at a time while the unit of work syncs the FK; it also catches
    ``post_update`` relationships, whose UPDATE fires no mapper event.
    """
    return {
        rel.key
        for rel in mapper.relationships
        if rel.direction.name == "MANYTOONE" and set(rel.local_columns) & columns
    }


def _watched(mapper: Mapper[Any], counters: list[Counter]) -> frozenset[str] | None:
    """Attribute keys of the FK, summed and ``where=`` columns and of the relationships setting
    the FK; ``None``: any write may matter."""
    columns: set[sa.Column[Any]] = set()
    for c in counters:
        if c.reads_other_tables:
            return None
        columns.add(c.fk)
        columns.update(c.value_columns())
    keys = _relationship_keys(mapper, columns)
    for col in columns:
        try:
            keys.add(mapper.get_property_by_column(col).key)
        except Exception:  # unmapped column: cannot watch it, so watch everything
            return None
    return frozenset(keys)


def _names(mapper: Mapper[Any], watched: frozenset[str] | None) -> frozenset[str] | None:
    if watched is None:
        return None
    out = set(watched)
    for key in watched:
        prop: Any = mapper.attrs[key]
        # Column attributes, and the FK columns of watched relationships.
        for col in getattr(prop, "columns", None) or prop.local_columns:
            out |= {col.key, col.name}
    return frozenset(out)


def _direct(
    mapper: Mapper[Any], counters: list[Counter]
) -> list[tuple[str, str | None, type]] | None:
    out: list[tuple[str, str | None, type]] = []
    for c in counters:
        if c.where is not None:
            return None
        try:
            fk_type = c.fk.type.python_type
            fk_attr = mapper.get_property_by_column(c.fk).key
            sum_attr = None if c.summed is None else mapper.get_property_by_column(c.summed).key
        except Exception:  # no python_type, or an unmapped column: re-read from the database
            return None
        out.append((fk_attr, sum_attr, fk_type))
    return out


def table_pk(mapper: Mapper[Any], table: sa.Table) -> list[sa.Column[Any]]:
    """``table``'s own columns for ``mapper``'s primary key, in identity-key order.

    A joined-inheritance subclass's identity is its base table's key; rows of
    another table of the class are read by that table's equivalent key columns.
    """
    out: list[sa.Column[Any]] = []
    for col in mapper.primary_key:
        by_table = {c.table: c for c in mapper.get_property_by_column(col).columns}
        found = by_table.get(table)
        assert isinstance(found, sa.Column)
        out.append(found)
    return out


def _plan(
    mapper: Mapper[Any], table: sa.Table, counters: list[Counter], *, one_table: bool
) -> WritePlan:
    watched = _watched(mapper, counters) if one_table else None
    return WritePlan(
        mapper,
        table,
        counters,
        table_pk(mapper, table),
        watched,
        _names(mapper, watched),
        _direct(mapper, counters) if one_table else None,
    )


def plans_for(mapper: Mapper[Any]) -> list[WritePlan]:
    """One write plan per table holding counted FKs that rows of ``mapper`` feed (flushes).

    A joined-inheritance subclass may feed counters through its base table's
    FK and through its own table's: the flush reads each table by its key.
    """
    if mapper in _plans:
        return _plans[mapper]
    by_table: dict[sa.Table, list[Counter]] = {}
    for counter in counters_of_child(mapper):
        by_table.setdefault(counter.child_table, []).append(counter)
    plans = [
        _plan(mapper, table, counters, one_table=True)
        for table, counters in sorted(by_table.items(), key=lambda kv: kv[0].name)
    ]
    _plans[mapper] = plans
    return plans


_statement_plans: dict[Mapper[Any], WritePlan | None] = {}


def plan_for(mapper: Mapper[Any]) -> WritePlan | None:
    """The write plan of ``mapper``'s bulk statements, or ``None`` when it feeds no counter.

    A statement writes through the mapped class: when its counters' FKs lie in
    several tables of a joined subclass, this one plan covers all of them, on
    the subclass's own table, and its rows are read through the class's join.
    """
    if mapper in _statement_plans:
        return _statement_plans[mapper]
    plans = plans_for(mapper)
    plan = plans[0] if len(plans) == 1 else None
    if len(plans) > 1:
        counters = sorted((c for p in plans for c in p.counters), key=lambda c: c.key)
        table = mapper.local_table
        assert isinstance(table, sa.Table)
        plan = _plan(mapper, table, counters, one_table=False)
    _statement_plans[mapper] = plan
    return plan


def reads_several_tables(plan: WritePlan) -> bool:
    """Whether the plan's counters read another table than the plan's (a joined subclass)."""
    return any(c.child_table is not plan.table or c.reads_other_tables for c in plan.counters)


def plan_for_statement(dml: Any) -> WritePlan | None:
    """The write plan for the table an ORM-enabled INSERT/UPDATE/DELETE writes, if any."""
    # A bulk statement can be a program's first use of the models, and the ORM
    # does not configure mappers for it: counters resolve at configuration.
    configure_mappers()
    desc = dml.entity_description
    entity = desc.get("entity")
    if entity is not None:
        return plan_for(sa.inspect(entity).mapper)
    # Core statement on a Table, still run through the Session: find its mapper.
    for mapper in child_mappers():
        if mapper.local_table is desc.get("table"):
            return plan_for(mapper)
    return None


def forget_plans() -> None:
    """Drop every cached plan: a newly resolved counter may change any of them."""
    _plans.clear()
    _statement_plans.clear()
    _collections.clear()
    _uncounted.clear()


_collections: dict[Mapper[Any], list[tuple[str, list[WritePlan]]]] = {}


def counted_collections(mapper: Mapper[Any]) -> list[tuple[str, list[WritePlan]]]:
    """``mapper``'s one-to-many relationships to counted children: key and the children's plans.

    Looked up per mapper, not per object of every flush (100 dirty parents:
    100 walks over their relationships).
    """
    found = _collections.get(mapper)
    if found is None:
        found = _collections[mapper] = [
            (rel.key, plans_for(rel.mapper))
            for rel in mapper.relationships
            if rel.direction.name == "ONETOMANY" and plans_for(rel.mapper)
        ]
    return found


#: A foreign key that counts nothing but references a counter's parent key:
#: its attribute key on the mapper (None: not mapped), the many-to-one
#: relationships that sync it, and a counter of that parent table.
UncountedFk = tuple[str | None, list[str], Counter]

_uncounted: dict[Mapper[Any], list[UncountedFk]] = {}


def uncounted_parent_fks(mapper: Mapper[Any]) -> list[UncountedFk]:
    """``mapper``'s foreign keys to a counter's parent key that count nothing.

    On InnoDB such a key's check takes a shared lock on a parent row while
    the flush already holds other parents of that table exclusively, out of
    their key order (:func:`.flush._flush_parents` locks it with them). Looked
    up once per mapper.
    """
    found = _uncounted.get(mapper)
    if found is not None:
        return found
    by_pk: dict[sa.Column[Any], Counter] = {}
    for child in child_mappers():
        for counter in counters_of_child(child):
            by_pk.setdefault(counter.parent_pk, counter)
    counted = {c.fk for c in counters_of_child(mapper)}
    found = []
    for table in mapper.tables:
        for fk in sorted(getattr(table, "foreign_keys", ()), key=lambda f: f.parent.name):
            try:
                target = fk.column
            except sa.exc.SQLAlchemyError:  # unresolvable here: no lock can be named
                continue
            parent_counter = by_pk.get(target)
            if parent_counter is None or fk.parent in counted:
                continue
            try:
                key: str | None = mapper.get_property_by_column(fk.parent).key
            except UnmappedColumnError:
                key = None
            syncs = [
                rel.key
                for rel in mapper.relationships
                if rel.direction.name == "MANYTOONE" and fk.parent in rel.local_columns
            ]
            found.append((key, syncs, parent_counter))
    _uncounted[mapper] = found
    return found
