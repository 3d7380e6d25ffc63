"""SQLAlchemy's legacy bulk API: exact through ``Session.execute``, or refused before writing.

``Session.bulk_insert_mappings`` / ``bulk_update_mappings`` /
``bulk_save_objects`` write without firing any event the library could
hook. For child classes that feed counters (outside :func:`.pause.paused`):

- ``bulk_insert_mappings(Child, rows)`` runs as
  ``session.execute(insert(Child), rows)`` and ``bulk_update_mappings(Child,
  rows)`` as ``session.execute(update(Child), rows)``: the ORM bulk statements
  SQLAlchemy documents as their replacements, which the library keeps exact;
- ``bulk_save_objects`` and ``bulk_insert_mappings(..., return_defaults=True)``
  are refused with :class:`.errors.CounterfillError` naming the replacement,
  before anything is written.

Every other class goes to SQLAlchemy's own methods unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, Session, configure_mappers

from .errors import CounterfillError
from .pause import is_paused

_METHODS = ("bulk_insert_mappings", "bulk_update_mappings", "bulk_save_objects")


def _counted(mapper: Any) -> Mapper[Any] | None:
    """The mapper of ``mapper`` (class or mapper) when its rows feed counters, else ``None``."""
    if is_paused():
        return None
    configure_mappers()  # raises a pending CounterDeclarationError: never write unmaintained
    m: Mapper[Any] = sa.inspect(mapper).mapper
    from .counters import counters_of_child

    return m if counters_of_child(m) else None


def _refuse(method: str, mapper: Mapper[Any], replacement: str) -> CounterfillError:
    name = mapper.class_.__name__
    return CounterfillError(
        f"Session.{method}() on {name} bypasses the events that keep its counters exact; "
        f"use {replacement.format(name=name)} instead (nothing was written)"
    )


def _bulk_insert_mappings(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def bulk_insert_mappings(
        self: Session,
        mapper: Any,
        mappings: Iterable[dict[str, Any]],
        return_defaults: bool = False,
        render_nulls: bool = False,
    ) -> None:
        counted = _counted(mapper)
        if counted is None:
            return original(self, mapper, mappings, return_defaults, render_nulls)
        if return_defaults:
            raise _refuse(
                "bulk_insert_mappings(return_defaults=True)",
                counted,
                "session.execute(insert({name}).returning(...), rows)",
            )
        rows = list(mappings)
        if rows:
            self.execute(sa.insert(counted), rows)
        return None

    return bulk_insert_mappings


def _bulk_update_mappings(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def bulk_update_mappings(
        self: Session, mapper: Any, mappings: Iterable[dict[str, Any]]
    ) -> None:
        counted = _counted(mapper)
        if counted is None:
            return original(self, mapper, mappings)
        rows = list(mappings)
        if rows:
            self.execute(sa.update(counted), rows)
        return None

    return bulk_update_mappings


def _bulk_save_objects(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def bulk_save_objects(self: Session, objects: Iterable[Any], *args: Any, **kw: Any) -> None:
        objects = list(objects)
        for obj in objects:
            counted = _counted(type(obj))
            if counted is not None:
                raise _refuse(
                    "bulk_save_objects",
                    counted,
                    "session.add_all(objects), or session.execute(insert({name}), rows) "
                    "and session.execute(update({name}), rows)",
                )
        return original(self, objects, *args, **kw)

    return bulk_save_objects


_WRAPPERS = {
    "bulk_insert_mappings": _bulk_insert_mappings,
    "bulk_update_mappings": _bulk_update_mappings,
    "bulk_save_objects": _bulk_save_objects,
}


def install() -> None:
    """Route the legacy bulk methods of :class:`~sqlalchemy.orm.Session` through the library.

    Idempotent. Patching the class (there is no event for these methods) also
    covers ``scoped_session`` and sessions created by ``sessionmaker``. The
    wrappers pass SQLAlchemy's parameters positionally:
    tests/test_orm_sqlalchemy_internals.py checks the signatures they assume.
    """
    for name in _METHODS:
        current = getattr(Session, name)
        if getattr(current, "_counterfill", False):
            continue
        wrapped = _WRAPPERS[name](current)
        wrapped._counterfill = True  # type: ignore[attr-defined]
        setattr(Session, name, wrapped)
