"""Resolve ``counter_cache()`` declarations into :class:`Counter` objects, and keep the registry.

No event code lives here: :mod:`.events` calls :func:`resolve_mapper` from its
``mapper_configured`` hook.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, DeclarativeBase, Mapper, configure_mappers, registry
from sqlalchemy.orm.attributes import QueryableAttribute
from sqlalchemy.sql import visitors

from . import inheritance
from .declaration import CounterSpec, spec_of
from .errors import CounterDeclarationError, CounterfillWarning, UnknownCounterError

# Counters fed by each child mapper (mappers have no ``info`` dict of their own).
_by_child: dict[Mapper[Any], list[Counter]] = {}


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
        """Whether ``where=`` or ``sum=`` reads a column of another table (any write may matter)."""
        if self.summed is not None and self.summed.table is not self.child_table:
            return True
        if self.where is None:
            return False
        return any(
            isinstance(el, sa.Column) and el.table is not self.child_table
            for el in visitors.iterate(self.where)
        )

    @functools.cached_property
    def summed_value(self) -> sa.ColumnElement[Any] | None:
        """The summed value as SQL over the counting table (``None`` for counts).

        The summed column itself, or, for a joined subclass summing a column
        of its own table while the FK lives in its base table, a correlated
        scalar subquery joined on the primary key.
        """
        if self.summed is None or self.summed.table is self.child_table:
            return self.summed
        assert self.child_mapper is not None
        return inheritance.value_over(self.child_mapper, self.child_table, self.summed)

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


def _resolve_target(
    spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any]
) -> tuple[Mapper[Any], sa.Column[Any]]:
    target = spec.target
    if isinstance(target, str):
        cls_name, _, attr = target.rpartition(".")
        if not cls_name or not attr:
            _fail(
                parent,
                column,
                f"counter_cache({target!r}) is not 'Child.fk_attribute'",
                'write it as counter_cache("Follow.followed_id")',
            )
        child = _find_class(parent, cls_name)
        if child is None:
            _fail(
                parent,
                column,
                f"counter_cache({target!r}) names unknown class {cls_name!r} "
                "(nor a table of that name in the parent's MetaData)",
                TARGET_HINT,
            )
        assert child is not None
    else:
        found = _attribute(_call(target, parent, column, "the target callable"))
        if found is None:
            _fail(
                parent,
                column,
                "the target callable did not return a mapped attribute or a table column",
                TARGET_HINT,
            )
        assert found is not None
        child, attr = found
    fk = _column_of(child, attr)
    if fk is None:
        _fail(
            parent,
            column,
            f"{child.class_.__name__} has no column attribute {attr!r}",
            f"name a mapped column of {child.class_.__name__} holding the parent's id",
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
    spec: CounterSpec,
    parent: Mapper[Any],
    column: sa.Column[Any],
    child: Mapper[Any],
) -> sa.Column[Any] | None:
    if spec.sum is None:
        return None
    if isinstance(spec.sum, str):
        summed = _column_of(child, spec.sum)
        label = spec.sum
    else:
        found = _attribute(_call(spec.sum, parent, column, "sum="))
        summed = _column_of(*found) if found else None
        label = found[1] if found else repr(spec.sum)
    if summed is None:
        _fail(
            parent,
            column,
            f"sum={label!r} is not a column of {child.class_.__name__}",
            f"name a numeric column attribute of {child.class_.__name__}",
        )
    assert summed is not None
    if not isinstance(summed.type, sa.Integer | sa.Numeric | sa.Float):
        _fail(
            parent,
            column,
            f"sum={label!r} is not numeric ({summed.type})",
            "sum an Integer or Numeric column, or count rows with where=",
        )
    # A joined subclass may sum a column of any of its tables (its own, with
    # the FK in the base table): the value is read joined on the primary key.
    if summed.table not in inheritance.hierarchy_tables(child):
        _fail(
            parent,
            column,
            f"sum={label!r} is a column of table {summed.table.name!r}, not of "
            f"{child.class_.__name__}'s tables",
            f"sum a column of {child.class_.__name__}, or count rows with where=",
        )
    return summed


def _resolve_where(
    spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any], child: Mapper[Any]
) -> Any:
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
    foreign = inheritance.tables_of(expr) - inheritance.hierarchy_tables(child)
    if foreign:
        names = ", ".join(sorted(repr(t.name) for t in foreign))
        _fail(
            parent,
            column,
            f"where= uses table {names}, not only {child.class_.__name__}'s own columns "
            "(a change there would move counters unseen)",
            f"filter on columns of {child.class_.__name__}, e.g. copy the flag onto it",
        )
    return expr


def sum_type(summed: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    """A sum's default column type: Numeric(p, s) and Float as summed, integers as BigInteger."""
    if isinstance(summed.type, sa.Numeric | sa.Float):
        return copy.copy(summed.type)  # keeps precision, scale and asdecimal
    return sa.BigInteger()


# Counters fed by rows of a plain association table (no mapper), by table.
_by_table: dict[sa.Table, list[Counter]] = {}

#: How to name a target, repeated by the declaration errors about one.
TARGET_HINT = (
    "name the FK attribute of a class mapped on the same declarative base "
    '("Follow.followed_id", lambda: Follow.followed_id) or, for a relationship(secondary=...) '
    'association Table in its MetaData, the table column ("followers.followed_id", '
    "lambda: followers.c.followed_id)"
)


def _other_key(fk: sa.Column[Any], parent_pk: sa.Column[Any]) -> str:
    """The refusal's reason when ``fk`` references another column of the parent's table.

    A foreign key to a unique non-key column of the parent (``userprofile.user_id``)
    looks right at a glance; the message says why it is refused.
    """
    others = sorted(
        f"{ref.column.table.name}.{ref.column.name}"
        for ref in fk.foreign_keys
        if ref.column.table is parent_pk.table and ref.column is not parent_pk
    )
    if not others:
        return ""
    return (
        f" (it references {', '.join(others)}, not the primary key: a counter keys on the "
        "parent's primary key, so the column must hold that id)"
    )


def _mapper_of_table(parent: Mapper[Any], table: sa.Table) -> Mapper[Any] | None:
    """The class mapped onto ``table`` in the parent's registry, if any: its flushes are seen."""
    for mapper in parent.registry.mappers:
        if mapper.local_table is table and not mapper.inherits:
            return mapper
    return None


def _table_target(
    spec: CounterSpec, parent: Mapper[Any], column: sa.Column[Any]
) -> tuple[sa.Table, str] | CounterSpec | None:
    """A plain association table target as ``(table, column name)``.

    A table that a class maps gives the spec rewritten to name that class;
    ``None`` leaves the target to the mapped-class resolution.
    """
    target = spec.target
    if isinstance(target, str):
        name, _, attr = target.rpartition(".")
        if not name or not attr or _find_class(parent, name) is not None:
            return None
        metadata: sa.MetaData = parent.local_table.metadata  # type: ignore[attr-defined]
        table = metadata.tables.get(name)
        if table is None:
            return None
    else:
        value = _call(target, parent, column, "the target callable")
        if not isinstance(value, sa.Column) or not isinstance(value.table, sa.Table):
            return None
        table, attr = value.table, value.key
    mapper = _mapper_of_table(parent, table)
    col = table.c.get(attr)
    if mapper is not None and col is not None:
        key = mapper.get_property_by_column(col).key
        return replace(spec, target=f"{mapper.class_.__name__}.{key}")
    return table, attr


def _resolve_association(
    spec: CounterSpec,
    parent: Mapper[Any],
    column: sa.Column[Any],
    parent_pk: sa.Column[Any],
    table: sa.Table,
    attr: str,
) -> Counter:
    """Resolve a counter over a plain association table (the child has no class)."""
    fk = table.c.get(attr)
    if not isinstance(fk, sa.Column):
        _fail(
            parent,
            column,
            f"{table.name} has no column attribute {attr!r}",
            f"name a column of {table.name} holding the parent's id",
        )
    assert isinstance(fk, sa.Column)
    if not any(fk_ref.column is parent_pk for fk_ref in fk.foreign_keys):
        _fail(
            parent,
            column,
            f"{table.name}.{fk.key} has no ForeignKey to {parent_pk.table.name}.{parent_pk.name}"
            + _other_key(fk, parent_pk),
            f'declare it as sa.Column(..., sa.ForeignKey("{parent_pk.table.name}.'
            f'{parent_pk.name}"))',
        )
    summed: Any = None
    if spec.sum is not None:
        value: Any = (
            table.c.get(spec.sum)
            if isinstance(spec.sum, str)
            else _call(spec.sum, parent, column, "sum=")
        )
        if isinstance(value, QueryableAttribute):
            value = value.expression
        label = spec.sum if isinstance(spec.sum, str) else getattr(value, "key", repr(spec.sum))
        if not isinstance(value, sa.Column) or value.table is not table:
            _fail(
                parent,
                column,
                f"sum={label!r} is not a column of {table.name}",
                f"name a numeric column of {table.name}",
            )
        if not isinstance(value.type, sa.Integer | sa.Numeric):
            _fail(
                parent,
                column,
                f"sum={label!r} is not numeric ({value.type})",
                "sum an Integer or Numeric column, or count rows with where=",
            )
        summed = value
    where: Any = None
    if spec.where is not None:
        where = _call(spec.where, parent, column, "where=")
        if hasattr(where, "__clause_element__"):
            where = where.__clause_element__()
        if not isinstance(where, sa.ColumnElement):
            _fail(
                parent,
                column,
                f"where= returned {type(where).__name__}, not a SQL expression",
                "return a boolean expression, e.g. "
                f"where=lambda: {table.name}.c.accepted.is_(True)",
            )
        others = sorted(
            {
                el.table.name
                for el in visitors.iterate(where)
                if isinstance(el, sa.Column) and el.table is not table
            }
        )
        if others:
            _fail(
                parent,
                column,
                f"where= reads {', '.join(others)}, not only the association table {table.name}",
                f"use only the columns of {table.name}, e.g. where=lambda: "
                f"{table.name}.c.accepted.is_(True)",
            )
    return _counter(spec, parent, column, parent_pk, None, table, fk, where, summed)


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
    found = _table_target(spec, parent, column)
    if isinstance(found, CounterSpec):  # a table that a class maps: count through the class
        spec = found
    elif found is not None:
        return _resolve_association(spec, parent, column, parent_pk, *found)
    child, fk = _resolve_target(spec, parent, column)
    if not any(fk_ref.column is parent_pk for fk_ref in fk.foreign_keys):
        _fail(
            parent,
            column,
            f"{child.class_.__name__}.{fk.key} has no ForeignKey to {parent_pk.table.name}."
            f"{parent_pk.name}" + _other_key(fk, parent_pk),
            f'declare it as mapped_column(ForeignKey("{parent_pk.table.name}.{parent_pk.name}"))',
        )
    child_table = fk.table
    assert isinstance(child_table, sa.Table)
    summed = _resolve_sum(spec, parent, column, child)
    where = _resolve_where(spec, parent, column, child)
    # One expression over the counting table: the subclass's rows only, then where=.
    conds = [c for c in (inheritance.restriction(child, child_table), where) if c is not None]
    if conds:
        where = inheritance.localize(child, child_table, inheritance.plain(sa.and_(*conds)))
    return _counter(spec, parent, column, parent_pk, child, child_table, fk, where, summed)


def _counter(
    spec: CounterSpec,
    parent: Mapper[Any],
    column: sa.Column[Any],
    parent_pk: sa.Column[Any],
    child: Mapper[Any] | None,
    child_table: sa.Table,
    fk: sa.Column[Any],
    where: sa.ColumnElement[bool] | None,
    summed: sa.Column[Any] | None,
) -> Counter:
    """Build the resolved Counter, settling a sum's default column type first."""
    if spec.sum is not None and spec.default_type and summed is not None:
        column.type = sum_type(summed)
    table = parent.local_table
    assert isinstance(table, sa.Table)
    return Counter(
        key=f"{table.name}.{column.name}",
        parent_mapper=parent,
        parent_table=table,
        parent_pk=parent_pk,
        column=column,
        attr_key=parent.get_property_by_column(column).key,
        child_mapper=child,
        child_table=child_table,
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
    """Counters that rows written through ``mapper`` may feed, ordered by key.

    Every counter declared on a class of ``mapper``'s inheritance hierarchy
    whose counting table is one of ``mapper``'s tables: a statement on the
    base class may write rows of any subclass, and each counter's ``where``
    already restricts it to its own class's rows.
    """
    tables = set(mapper.tables)
    found = [
        c
        for m in mapper.base_mapper.self_and_descendants
        for c in _by_child.get(m, ())
        if c.child_table in tables
    ]
    return sorted(found, key=lambda c: c.key)


# Mappers whose counters failed to resolve: configured again (and failing) until fixed.
_failed: weakref.WeakKeyDictionary[Mapper[Any], CounterDeclarationError] = (
    weakref.WeakKeyDictionary()
)


def retry_failed(mapper: Mapper[Any]) -> None:
    """Let a mapper whose counters failed to resolve be configured (and resolved) again.

    SQLAlchemy would answer the retry with a generic "mappers failed to
    initialize"; the declaration is resolved again instead, and fails again
    with its own message unless it was fixed (a late import, say).
    """
    # SQLAlchemy internal (no public API clears a failed configuration): it keeps
    # a hook's error in ``mapper._configure_failed``; checked by
    # tests/test_orm_sqlalchemy_internals.py so a change fails loudly.
    if mapper in _failed and _failed[mapper] is getattr(mapper, "_configure_failed", None):
        mapper.__dict__.pop("_configure_failed", None)


def resolve_mapper(mapper: Mapper[Any]) -> list[Counter]:
    """Resolve and register the not yet resolved counter columns of ``mapper``'s table.

    All or nothing: on a :class:`CounterDeclarationError` none of the mapper's
    counters is registered and the mapper is left unconfigured, so every
    later configuration (the next request, the next test, the CLI) resolves it
    again and fails again until the declaration is fixed. SQLAlchemy marks the
    mapper configured before its ``mapper_configured`` hook runs; without
    this, the next configuration would succeed and the application would run
    with counters nobody maintains. Returns the counters resolved now.
    """
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        return []
    pending = [
        (column, spec)
        for column in table.columns
        if (spec := spec_of(column)) is not None and spec.resolved is None
    ]
    try:
        resolved = [(spec, resolve(mapper, column, spec)) for column, spec in pending]
    except CounterDeclarationError as exc:
        # SQLAlchemy internals, kept because no public API marks a registry as
        # needing configuration again: without them the next configuration
        # would be a no-op (tests/test_orm_sqlalchemy_internals.py guards them).
        mapper.configured = False
        mapper.registry._new_mappers = True
        _failed[mapper] = exc
        raise
    _failed.pop(mapper, None)
    found: list[Counter] = []
    for spec, counter in resolved:
        spec.resolved = counter
        if counter.child_mapper is None:
            _by_table.setdefault(counter.child_table, []).append(counter)
        else:
            _by_child.setdefault(counter.child_mapper, []).append(counter)
        found.append(counter)
    return found


_warned: set[tuple[str, str]] = set()


def warn_database_cascades() -> None:
    """Warn once per counter and relationship whose children a database cascade deletes unseen."""
    for counters in list(_by_child.values()):
        for counter in counters:
            for mapper in counter.parent_mapper.registry.mappers:
                for rel in mapper.relationships:
                    _warn_cascade(counter, rel)


def _warn_cascade(counter: Counter, rel: Any) -> None:
    if not rel.passive_deletes or rel.direction.name != "ONETOMANY":
        return
    if counter.child_table not in set(rel.mapper.tables):
        return
    # CASCADE deletes counted rows; SET NULL matters only when it empties the counter's FK.
    fks = [
        fk
        for col in rel.remote_side
        for fk in getattr(col, "foreign_keys", ())
        if (fk.ondelete or "").upper() == "CASCADE"
        or ((fk.ondelete or "").upper() == "SET NULL" and fk.parent is counter.fk)
    ]
    key = (counter.key, str(rel))
    if not fks or key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"{counter.parent_mapper.class_.__name__}.{counter.attr_key}: deleting a "
        f"{rel.parent.class_.__name__} changes {rel.mapper.class_.__name__} rows through the "
        f"database's ON DELETE {fks[0].ondelete.upper()} ({rel} has passive_deletes=True), "
        "which the ORM does not see, so the counter drifts; drop passive_deletes=True, or run "
        "`alembic counterfill verify --fix` after such deletes",
        CounterfillWarning,
        stacklevel=2,
    )


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
