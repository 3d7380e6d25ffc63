"""Resolve ``counter_cache()`` declarations into :class:`Counter` objects, and keep the registry.

No event code lives here: :mod:`.events` calls :func:`resolve_mapper` from its
``mapper_configured`` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, DeclarativeBase, Mapper, configure_mappers, registry
from sqlalchemy.orm.attributes import QueryableAttribute
from sqlalchemy.sql import visitors

from .declaration import CounterSpec, spec_of
from .errors import CounterDeclarationError, UnknownCounterError

# Counters fed by each child mapper (mappers have no ``info`` dict of their own).
_by_child: dict[Mapper[Any], list[Counter]] = {}
# Counters fed by rows of a plain association table (no mapper), by table.
_by_table: dict[sa.Table, list[Counter]] = {}

#: How to name a target, repeated by every declaration error that is about one.
TARGET_HINT = (
    "name the FK attribute of a class mapped on the same declarative base "
    '("Follow.followed_id", lambda: Follow.followed_id) or, for a relationship(secondary=...) '
    'association Table in its MetaData, the table column ("followers.followed_id", '
    "lambda: followers.c.followed_id)"
)


@dataclass(frozen=True, eq=False)
class Counter:
    """One resolved counter: a parent column kept equal to a COUNT or SUM over a child table.

    ``key`` is ``"<parent table>.<column>"``. ``where`` is a SQL boolean over the
    child table (or ``None``); ``summed`` the child column added up (``None``
    counts rows). ``child_mapper`` is ``None`` when the child is a plain
    association ``Table`` (``relationship(secondary=...)``) that no class maps.
    """

    key: str
    parent_mapper: Mapper[Any]
    parent_table: sa.Table
    parent_pk: sa.Column[Any]
    column: sa.Column[Any]
    attr_key: str
    child_mapper: Mapper[Any] | None
    child_table: sa.Table
    fk: sa.Column[Any]
    where: sa.ColumnElement[bool] | None
    summed: sa.Column[Any] | None

    @property
    def name(self) -> str:
        """The counter column's name."""
        return self.column.name

    def value_columns(self) -> list[sa.Column[Any]]:
        """Child columns besides the FK whose change can change a row's contribution.

        The summed column, then the child-table columns ``where=`` reads, in
        expression order (a column may appear twice).
        """
        cols: list[sa.Column[Any]] = []
        if self.summed is not None:
            cols.append(self.summed)
        if self.where is not None:
            cols += [
                el
                for el in visitors.iterate(self.where)
                if isinstance(el, sa.Column) and el.table is self.child_table
            ]
        return cols

    @property
    def reads_other_tables(self) -> bool:
        """Whether ``where=`` reads a column of another table (then any write may matter)."""
        if self.where is None:
            return False
        return any(
            isinstance(el, sa.Column) and el.table is not self.child_table
            for el in visitors.iterate(self.where)
        )

    def __repr__(self) -> str:
        return f"<Counter {self.key}>"


def _fail(parent: Mapper[Any], column: sa.Column[Any], problem: str, fix: str) -> None:
    raise CounterDeclarationError(f"{parent.class_.__name__}.{column.key}: {problem}; {fix}")


def _find_class(parent: Mapper[Any], name: str) -> Mapper[Any] | None:
    """Look a class name up in the parent's declarative registry, like ``relationship()`` does."""
    reg: registry = parent.registry
    for mapper in reg.mappers:
        cls = mapper.class_
        if name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return mapper
    return None


def _column_of(mapper: Mapper[Any], attr_key: str) -> sa.Column[Any] | None:
    prop = (
        mapper.get_property(attr_key, _configure_mappers=False)
        if mapper.has_property(attr_key)
        else None
    )
    if isinstance(prop, ColumnProperty) and len(prop.columns) == 1:
        col = prop.columns[0]
        if isinstance(col, sa.Column):
            return col
    return None


def _attribute(value: Any) -> tuple[Mapper[Any], str] | None:
    if isinstance(value, QueryableAttribute):
        return value.parent.mapper, value.key
    return None


@dataclass(frozen=True)
class _Child:
    """The resolved child: a mapped class, or a plain association table (``mapper`` None)."""

    mapper: Mapper[Any] | None
    table: sa.Table

    @property
    def label(self) -> str:
        return self.mapper.class_.__name__ if self.mapper is not None else self.table.name

    def column(self, name: str) -> sa.Column[Any] | None:
        if self.mapper is not None:
            return _column_of(self.mapper, name)
        col = self.table.c.get(name)
        return col if isinstance(col, sa.Column) else None


def _mapper_of_table(parent: Mapper[Any], table: sa.Table) -> Mapper[Any] | None:
    """The class mapped onto ``table`` in the parent's registry, if any: its flushes are seen."""
    for mapper in parent.registry.mappers:
        if mapper.local_table is table and not mapper.inherits:
            return mapper
    return None


def _table_child(parent: Mapper[Any], column: sa.Column[Any]) -> tuple[_Child, str]:
    table = column.table
    assert isinstance(table, sa.Table)
    mapper = _mapper_of_table(parent, table)
    if mapper is not None:
        return _Child(mapper, table), mapper.get_property_by_column(column).key
    return _Child(None, table), column.key


def _resolve_target(
    spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any]
) -> tuple[_Child, sa.Column[Any]]:
    target = spec.target
    child: _Child | None = None
    if isinstance(target, str):
        cls_name, _, attr = target.rpartition(".")
        if not cls_name or not attr:
            _fail(
                parent,
                column,
                f"counter_cache({target!r}) is not 'Child.fk_attribute'",
                'write it as counter_cache("Follow.followed_id"), or "followers.followed_id" '
                "for an association table",
            )
        mapper = _find_class(parent, cls_name)
        if mapper is not None:
            child = _Child(mapper, mapper.local_table)  # type: ignore[arg-type]
        else:
            # A mapped class name wins; otherwise a table in the parent's MetaData.
            metadata: sa.MetaData = parent.local_table.metadata  # type: ignore[attr-defined]
            table = metadata.tables.get(cls_name)
            if table is not None:
                child = _Child(_mapper_of_table(parent, table), table)
                col = table.c.get(attr)
                if child.mapper is not None and col is not None:
                    attr = child.mapper.get_property_by_column(col).key
        if child is None:
            _fail(
                parent,
                column,
                f"counter_cache({target!r}) names unknown class {cls_name!r} "
                "(nor a table of that name in the parent's MetaData)",
                TARGET_HINT,
            )
    else:
        value = _call(target, parent, column, "the target callable")
        found = _attribute(value)
        if found is not None:
            mapper, attr = found
            child = _Child(mapper, mapper.local_table)  # type: ignore[arg-type]
        elif isinstance(value, sa.Column) and isinstance(value.table, sa.Table):
            child, attr = _table_child(parent, value)
        else:
            _fail(
                parent,
                column,
                "the target callable did not return a mapped attribute or a table column",
                TARGET_HINT,
            )
    assert child is not None
    fk = child.column(attr)
    if fk is None:
        _fail(
            parent,
            column,
            f"{child.label} has no column attribute {attr!r}",
            f"name a column of {child.label} holding the parent's id",
        )
    assert fk is not None
    return child, fk


def _call(fn: Callable[[], Any], parent: Mapper[Any], column: sa.Column[Any], what: str) -> Any:
    try:
        return fn()
    except Exception as exc:  # user code: report it against the declaration
        _fail(
            parent,
            column,
            f"{what} raised {type(exc).__name__}: {exc}",
            "make it a zero-argument lambda over the child's mapped attributes",
        )


def _resolve_sum(
    spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any], child: _Child
) -> sa.Column[Any] | None:
    if spec.sum is None:
        return None
    summed: sa.Column[Any] | None
    if isinstance(spec.sum, str):
        summed = child.column(spec.sum)
        label = spec.sum
    else:
        value = _call(spec.sum, parent, column, "sum=")
        found = _attribute(value)
        if found is not None:
            summed, label = _column_of(*found), found[1]
        elif isinstance(value, sa.Column):
            summed, label = value, value.key
        else:
            summed, label = None, repr(spec.sum)
        if summed is not None and summed.table is not child.table:
            summed = None
    if summed is None:
        _fail(
            parent,
            column,
            f"sum={label!r} is not a column of {child.label}",
            f"name a numeric column of {child.label}",
        )
    assert summed is not None
    if not isinstance(summed.type, sa.Integer | sa.Numeric):
        _fail(
            parent,
            column,
            f"sum={label!r} is not numeric ({summed.type})",
            "sum an Integer or Numeric column, or count rows with where=",
        )
    return summed


def _resolve_where(spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any]) -> Any:
    if spec.where is None:
        return None
    expr = _call(spec.where, parent, column, "where=")
    if hasattr(expr, "__clause_element__"):
        expr = expr.__clause_element__()
    if not isinstance(expr, sa.ColumnElement):
        _fail(
            parent,
            column,
            f"where= returned {type(expr).__name__}, not a SQL expression",
            "return a boolean expression, e.g. where=lambda: Post.published.is_(True)",
        )
    return expr


def resolve(parent: Mapper[Any], column: sa.Column[Any], spec: CounterSpec) -> Counter:
    """Resolve one declaration on ``parent``; raise :class:`CounterDeclarationError` on mistakes."""
    pks = parent.primary_key
    if len(pks) != 1:
        _fail(
            parent,
            column,
            "composite primary keys on the parent are not supported yet",
            "give the parent a single-column primary key (a surrogate id)",
        )
    parent_pk = pks[0]
    assert isinstance(parent_pk, sa.Column)
    child, fk = _resolve_target(spec, parent, column)
    if not any(fk_ref.column is parent_pk for fk_ref in fk.foreign_keys):
        _fail(
            parent,
            column,
            f"{child.label}.{fk.key} has no ForeignKey to {parent_pk.table.name}.{parent_pk.name}",
            f'declare it as mapped_column(ForeignKey("{parent_pk.table.name}.{parent_pk.name}"))',
        )
    summed = _resolve_sum(spec, parent, column, child)
    where = _resolve_where(spec, parent, column)
    if child.mapper is None and where is not None:
        others = sorted(
            {
                el.table.name
                for el in visitors.iterate(where)
                if isinstance(el, sa.Column) and el.table is not child.table
            }
        )
        if others:
            _fail(
                parent,
                column,
                f"where= reads {', '.join(others)}, not only the association table {child.label}",
                f"use only the columns of {child.label}, e.g. where=lambda: "
                f"{child.label}.c.accepted.is_(True)",
            )
    table = parent.local_table
    assert isinstance(table, sa.Table)
    return Counter(
        key=f"{table.name}.{column.name}",
        parent_mapper=parent,
        parent_table=table,
        parent_pk=parent_pk,
        column=column,
        attr_key=parent.get_property_by_column(column).key,
        child_mapper=child.mapper,
        child_table=child.table,
        fk=fk,
        where=where,
        summed=summed,
    )


def counters_of_table(table: Any) -> list[Counter]:
    """Counters fed by rows of the plain association table ``table`` (none if it is mapped)."""
    return _by_table.get(table, [])


def association_tables() -> list[sa.Table]:
    """Every plain association table that feeds at least one counter."""
    return list(_by_table)


def counters_of_child(mapper: Mapper[Any]) -> list[Counter]:
    """Counters fed by rows of ``mapper`` (or of a mapper it inherits from)."""
    found: list[Counter] = []
    for m in mapper.iterate_to_root():
        found.extend(_by_child.get(m, ()))
    return found


def resolve_mapper(mapper: Mapper[Any]) -> list[Counter]:
    """Resolve and register the not yet resolved counter columns of ``mapper``'s table.

    Returns the counters resolved now (each registered under its child mapper,
    or under its association table when no class maps it).
    """
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        return []
    found: list[Counter] = []
    for column in table.columns:
        spec = spec_of(column)
        if spec is None or spec.resolved is not None:
            continue
        counter = resolve(mapper, column, spec)
        spec.resolved = counter
        if counter.child_mapper is None:
            _by_table.setdefault(counter.child_table, []).append(counter)
        else:
            _by_child.setdefault(counter.child_mapper, []).append(counter)
        found.append(counter)
    return found


def child_mappers() -> list[Mapper[Any]]:
    """Every mapper that feeds at least one counter."""
    return list(_by_child)


def _metadata_of(target: Any) -> sa.MetaData:
    if isinstance(target, sa.MetaData):
        return target
    if isinstance(target, registry):
        return target.metadata
    if isinstance(target, type) and issubclass(target, DeclarativeBase):
        return target.metadata
    md = getattr(target, "metadata", None)
    if isinstance(md, sa.MetaData):
        return md
    raise TypeError(f"expected a declarative base, registry or MetaData, got {target!r}")


def counters_of(target: Any) -> list[Counter]:
    """Every counter declared in ``target`` (declarative base, registry or MetaData), by key."""
    metadata = _metadata_of(target)
    configure_mappers()
    found: list[Counter] = []
    for table in metadata.sorted_tables:
        for column in table.columns:
            spec = spec_of(column)
            if spec is None:
                continue
            if spec.resolved is None:
                raise CounterDeclarationError(
                    f"{table.name}.{column.name}: counter_cache() column is not mapped; "
                    "declare it on a mapped class and import the models before use"
                )
            counter: Counter = spec.resolved
            found.append(counter)
    return sorted(found, key=lambda c: c.key)


def select_counters(counters: Iterable[Counter], keys: Iterable[str]) -> list[Counter]:
    """Pick counters by key, raising :class:`UnknownCounterError` naming any unknown key."""
    by_key = {c.key: c for c in counters}
    chosen: list[Counter] = []
    for key in keys:
        if key not in by_key:
            known = ", ".join(sorted(by_key)) or "none declared"
            raise UnknownCounterError(f"unknown counter {key!r}; declared counters: {known}")
        chosen.append(by_key[key])
    return chosen
