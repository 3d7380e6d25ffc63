"""``counter_cache()``: the public way to declare a counter column.

It builds the column with its spec (:mod:`.declaration`) and arms the
library's SQLAlchemy events (:mod:`.events`), which is why it sits above them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import MappedColumn, mapped_column

from . import events
from .declaration import INFO_KEY, CounterSpec, Target


def counter_cache(
    target: Target,
    *,
    where: Callable[[], Any] | None = None,
    sum: str | Callable[[], Any] | None = None,  # noqa: A002 - public keyword
    type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]] | None = None,
    buffered: bool = False,
    **column_kwargs: Any,
) -> MappedColumn[Any]:
    """Declare a counter cache column kept exact from the child table named by ``target``.

    :param target: ``"Child.fk_attribute"`` (resolved through the declarative
        registry) or ``lambda: Child.fk_attribute``; for a plain association
        table used as ``relationship(secondary=...)``, ``"table.fk_column"``
        or ``lambda: table.c.fk_column``.
    :param where: zero-argument callable returning a SQL boolean expression on
        the child's own columns; only matching child rows count.
    :param sum: child attribute name (or callable returning it) whose values are
        added up instead of counting rows.
    :param type_: column type; ``Integer`` for counts; for sums the summed column's
        type (``Numeric(p, s)`` and ``Float`` as they are, integers as ``BigInteger``).
    :param buffered: hot-parent mode: writers append deltas to an insert-only
        deltas table instead of updating the parent row, and a fold moves them
        into the column later. Exact through :func:`~.read.counter_value`; the
        plain attribute lags by up to the fold interval (docs/increment-logic.md).
    :param column_kwargs: passed on to :func:`sqlalchemy.orm.mapped_column`
        (``name=``, ``doc=``, ``comment=`` ...).
    """
    if not (isinstance(target, str) or callable(target)):
        raise TypeError(
            "counter_cache() needs 'Child.fk_attribute' or a callable returning the attribute"
        )
    if where is not None and not callable(where):
        raise TypeError("counter_cache(where=...) must be a zero-argument callable (a lambda)")
    # Declaring arms every hook: the mapper hook that resolves this declaration,
    # and the Session hooks, so that a first statement that is a bulk one is seen.
    events.install()

    default_type = type_ is None and sum is not None
    if type_ is None:
        # A sum's final type follows the summed column, known at mapper configuration.
        type_ = sa.BigInteger() if sum is not None else sa.Integer()
    info = dict(column_kwargs.pop("info", None) or {})
    info[INFO_KEY] = CounterSpec(
        target=target, where=where, sum=sum, buffered=buffered, default_type=default_type
    )
    column_kwargs.setdefault("nullable", False)
    column_kwargs.setdefault("server_default", "0")
    column_kwargs.setdefault("insert_default", 0)
    mapped = mapped_column(type_, info=info, **column_kwargs)
    if default_type:
        events.configure_before_create(mapped.column)
    if buffered:
        events.watch_buffered(mapped.column)
    return mapped
