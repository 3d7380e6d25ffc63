"""The declaration: the counter spec that ``counter_cache()`` puts in ``Column.info``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

#: The key under which a counter's :class:`CounterSpec` is stored in ``Column.info``.
INFO_KEY = "counterfill"

Target = str | Callable[[], Any]


@dataclass(eq=False)
class CounterSpec:
    """What the user declared; resolved into a :class:`~.counters.Counter` at mapper configuration.

    ``target`` is ``"Child.fk_attr"`` or a zero-argument callable returning the
    child's mapped FK attribute (or ``"table.fk_col"`` / a callable returning
    ``table.c.fk_col`` for a plain association table); ``where`` a
    zero-argument callable returning a SQL boolean over the child's columns;
    ``sum`` a child attribute name or callable returning the attribute to add
    up instead of counting rows; ``buffered`` the hot-parent mode (:mod:`.buffer`).
    """

    target: Target
    where: Callable[[], Any] | None = None
    sum: str | Callable[[], Any] | None = None
    buffered: bool = False
    #: No ``type_=`` given for a sum: the column takes the summed column's type at resolution.
    default_type: bool = False
    # The resolved Counter, set at mapper configuration. Typed Any because this
    # module sits below counters.py in the import layers (docs/architecture.md).
    resolved: Any = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> CounterSpec:
        # Column.info is copied when columns are copied onto declarative
        # classes; the spec is immutable user input, so sharing it is right.
        return self


def spec_of(column: sa.Column[Any]) -> CounterSpec | None:
    """Return the counter spec carried by ``column``, or ``None`` for ordinary columns."""
    spec = column.info.get(INFO_KEY) if column.info else None
    return spec if isinstance(spec, CounterSpec) else None
