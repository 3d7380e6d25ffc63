"""The write plan of a child mapper: which counters its rows feed and how to read what a row counts.

Every write path (flush, bulk INSERT, bulk UPDATE/DELETE) asks :func:`plan_for`
(or :func:`plan_for_statement`) first; ``None`` means the write touches no
counter. Not to be confused with :class:`.planning.BackfillPlan`, a backfill's batches.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, configure_mappers
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
    # The row type of :meth:`inserted_row`, labelled like :func:`.sql.row_state`'s k/v columns.
    inserted_type: Any

    def inserted_row(self, state: InstanceState[Any]) -> Any:
        """The ``k<i>``/``v<i>`` row of a just-inserted object, or None to re-read it."""
        if self.direct is None:
            return None
        row: list[Any] = []
        values = state.dict
        for fk_attr, sum_attr, fk_type in self.direct:
            if fk_attr not in values or (sum_attr is not None and sum_attr not in values):
                return None  # server-side default: only the database knows the value
            parent = values[fk_attr]
            if parent is not None and not isinstance(parent, fk_type):
                return None  # the database will coerce it; let it tell us the result
            row.append(parent)
            row.append(1 if sum_attr is None else (values[sum_attr] or 0))
        return self.inserted_type(*row)

    def may_change(self, state: InstanceState[Any]) -> bool:
        """Whether a dirty object's pending changes can move one of its contributions."""
        if self.watched is None:
            return True
        attrs = state.attrs
        return any(attrs[k].history.has_changes() for k in self.watched)


_plans: dict[Mapper[Any], WritePlan | None] = {}


def _watched(mapper: Mapper[Any], counters: list[Counter]) -> frozenset[str] | None:
    """Attribute keys of the FK, summed and ``where=`` columns; ``None``: any write may matter."""
    columns: set[sa.Column[Any]] = set()
    for c in counters:
        if c.reads_other_tables:
            return None
        columns.add(c.fk)
        columns.update(c.value_columns())
    keys = set()
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
        for col in mapper.attrs[key].columns:
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


def plan_for(mapper: Mapper[Any]) -> WritePlan | None:
    """The write plan for rows of ``mapper``, or ``None`` when it feeds no counter."""
    if mapper in _plans:
        return _plans[mapper]
    counters = counters_of_child(mapper)
    plan = None
    if counters:
        table = counters[0].child_table
        counters = [c for c in counters if c.child_table is table]
        pk_columns = [c for c in mapper.primary_key if isinstance(c, sa.Column)]
        watched = _watched(mapper, counters)
        fields = [f"{kv}{i}" for i in range(len(counters)) for kv in "kv"]
        plan = WritePlan(
            mapper,
            table,
            counters,
            pk_columns,
            watched,
            _names(mapper, watched),
            _direct(mapper, counters),
            namedtuple("Inserted", fields),
        )
    _plans[mapper] = plan
    return plan


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
