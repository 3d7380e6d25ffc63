"""``counter_cache()``: declare a counter column whose spec travels in ``Column.info``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import MappedColumn, configure_mappers, mapped_column

if TYPE_CHECKING:
    from .counters import Counter

#: The key under which a counter's :class:`CounterSpec` is stored in ``Column.info``.
INFO_KEY = "counterfill"

Target = str | Callable[[], Any]


@dataclass(eq=False)
class CounterSpec:
    """What the user declared; resolved into a :class:`~.counters.Counter` at mapper configuration.

    ``target`` is ``"Child.fk_attr"`` or a zero-argument callable returning the
    child's mapped FK attribute; ``where`` a zero-argument callable returning a
    SQL boolean over the child's columns; ``sum`` a child attribute name or
    callable returning the attribute to add up instead of counting rows.
    """

    target: Target
    where: Callable[[], Any] | None = None
    sum: str | Callable[[], Any] | None = None
    #: No ``type_=`` given for a sum: the column takes the summed column's type at resolution.
    default_type: bool = False
    resolved: Counter | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> CounterSpec:
        # Column.info is copied when columns are copied onto declarative
        # classes; the spec is immutable user input, so sharing it is right.
        return self


def counter_cache(
    target: Target,
    *,
    where: Callable[[], Any] | None = None,
    sum: str | Callable[[], Any] | None = None,  # noqa: A002 - public keyword
    type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]] | None = None,
    **column_kwargs: Any,
) -> MappedColumn[Any]:
    """Declare a counter cache column kept exact from the child table named by ``target``.

    :param target: ``"Child.fk_attribute"`` (resolved through the declarative
        registry) or ``lambda: Child.fk_attribute``.
    :param where: zero-argument callable returning a SQL boolean expression on
        the child; only matching child rows count.
    :param sum: child attribute name (or callable returning it) whose values are
        added up instead of counting rows.
    :param type_: column type; ``Integer`` for counts; for sums the summed column's
        type (``Numeric(p, s)`` and ``Float`` as they are, integers as ``BigInteger``).
    :param column_kwargs: passed on to :func:`sqlalchemy.orm.mapped_column`
        (``name=``, ``doc=``, ``comment=`` ...).
    """
    if not (isinstance(target, str) or callable(target)):
        raise TypeError(
            "counter_cache() needs 'Child.fk_attribute' or a callable returning the attribute"
        )
    if where is not None and not callable(where):
        raise TypeError("counter_cache(where=...) must be a zero-argument callable (a lambda)")
    # Importing counters registers the mapper hook that resolves declarations;
    # the Session hooks go in now so a first statement that is a bulk one is seen.
    from . import counters  # noqa: F401
    from .listeners import install_session_hooks

    install_session_hooks()

    default_type = type_ is None and sum is not None
    if type_ is None:
        # A sum's final type follows the summed column, known at mapper configuration.
        type_ = sa.BigInteger() if sum is not None else sa.Integer()
    info = dict(column_kwargs.pop("info", None) or {})
    info[INFO_KEY] = CounterSpec(target=target, where=where, sum=sum, default_type=default_type)
    column_kwargs.setdefault("nullable", False)
    column_kwargs.setdefault("server_default", "0")
    column_kwargs.setdefault("insert_default", 0)
    mapped = mapped_column(type_, info=info, **column_kwargs)
    if default_type:
        event.listen(mapped.column, "after_parent_attach", _type_before_create)
    return mapped


def _type_before_create(column: sa.Column[Any], table: Any) -> None:
    # CREATE TABLE before the first mapper configuration must see the final type.
    if isinstance(table, sa.Table) and not event.contains(table, "before_create", _configure):
        event.listen(table, "before_create", _configure)


def _configure(*args: Any, **kwargs: Any) -> None:
    configure_mappers()


def spec_of(column: sa.Column[Any]) -> CounterSpec | None:
    """Return the counter spec carried by ``column``, or ``None`` for ordinary columns."""
    spec = column.info.get(INFO_KEY) if column.info else None
    return spec if isinstance(spec, CounterSpec) else None
