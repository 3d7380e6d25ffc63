"""Counter columns are read-only to the application, as Rails makes counter-cache columns.

No flush writes a counter value that came from application state: a
``session.merge()`` never copies counters (the merged object keeps, or loads,
the database's value), and a value assigned to a counter attribute is
discarded before the flush (the attribute is expired, so it reads the
database's value afterwards; a new parent starts from the column default).
An explicit assignment also warns, since it is always a mistake: set a counter
deliberately with ``alembic counterfill verify --fix`` or a Core
``UPDATE`` statement, which the library leaves alone.
"""

from __future__ import annotations

import warnings
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState

from .errors import CounterfillWarning

# Counter attribute keys per parent mapper (subclass mappers inherit them).
_protected: dict[Mapper[Any], set[str]] = {}


class CounterColumnProperty(ColumnProperty[Any]):
    """A counter's column property: ``merge()`` leaves the destination's database value alone."""

    __slots__ = ()

    def merge(self, *args: Any, **kwargs: Any) -> None:
        # A merged copy (a detached parent loaded before children were added)
        # carries a stale counter; the destination keeps or loads the database's.
        return None


def protect(parent: Mapper[Any], attr_key: str) -> bool:
    """Record ``parent.attr_key`` as a counter and stop ``merge()`` copying it.

    Returns whether it is new (then :mod:`.events` adds the assignment warning).
    """
    keys = _protected.setdefault(parent, set())
    if attr_key in keys:
        return False
    keys.add(attr_key)
    prop = parent.get_property(attr_key)
    if type(prop) is ColumnProperty:
        # SQLAlchemy has no merge event; swapping the class (same layout, no slots
        # added) overrides merge() only. tests/test_orm_sqlalchemy_internals.py
        # checks merge()'s signature so a change fails loudly.
        prop.__class__ = CounterColumnProperty
    return True


def warn_assignment(target: Any, value: Any, oldvalue: Any, initiator: Any) -> None:
    """Warn that a value assigned to a counter attribute will not be written."""
    name = f"{type(target).__name__}.{initiator.key}"
    warnings.warn(
        f"{name} is a counter cache: the assigned value is never written (the database's "
        "value wins); to set a counter deliberately run `alembic counterfill verify --fix` "
        "or a Core UPDATE statement",
        CounterfillWarning,
        stacklevel=3,
    )


def _keys_of(mapper: Mapper[Any]) -> set[str]:
    found: set[str] = set()
    for m in mapper.iterate_to_root():
        found |= _protected.get(m, set())
    return found


def discard_assignments(session: Session, flush_context: Any, instances: Any) -> None:
    """Drop application-set counter values from dirty and new parents before the flush writes."""
    if not _protected:
        return
    # Per class, not per object: a flush of 1,000 new children of a class with
    # no counter would otherwise pay 1,000 inspections (~15 ms, bench/live_overhead.py).
    by_class: dict[type, set[str]] = {}
    for obj in (*session.new, *session.dirty):
        cls = type(obj)
        keys = by_class.get(cls)
        if keys is None:
            keys = by_class[cls] = _keys_of(sa.inspect(cls))
        if not keys:
            continue
        state: InstanceState[Any] = instance_state(obj)
        # Any assigned attribute has its previous value in committed_state; a
        # lookup there costs a fraction of computing its history (12 ms per
        # flush of 100 dirty parents with collections, bench/live_overhead.py).
        committed = state.committed_state
        changed = [k for k in keys if k in committed]
        if not changed:
            continue
        if state.key is None:  # pending: the INSERT takes the column default
            for k in changed:
                state.dict.pop(k, None)
                state.committed_state.pop(k, None)
        else:  # persistent: expire, so the next read loads the database's value
            session.expire(obj, changed)
