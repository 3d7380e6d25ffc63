"""Every SQLAlchemy event the library listens to, registered in one place.

- ``before_mapper_configured`` / ``mapper_configured`` (all mappers): resolve
  the counters a mapper declares (a failed declaration is resolved again at
  every configuration), attach the flush hooks to the child mappers that feed
  them and make the counter attributes read-only (:mod:`.readonly`);
- ``after_configured``: warn about database cascades the ORM does not see;
- Session flush events and ``after_soft_rollback``: :mod:`.flush`;
- ``do_orm_execute``: ORM bulk statements, :mod:`.bulk`;
- ``before_execute``/``after_execute`` on every Engine and ``after_configured``,
  once a counter over a plain association table exists: :mod:`.association`
  (the unit of work writes ``relationship(secondary=...)`` rows with
  ``Connection.execute``, which no ORM event sees);
- ``after_cursor_execute`` on the one Connection whose flush's locking reads
  found rows gone: :func:`.flush.statement_ran` checks that flush's DELETE
  and UPDATE statements (a row re-inserted meanwhile is refused, never
  counted wrong); :mod:`.flush` asks for it through :func:`.flush.listen_with`;
- the legacy bulk methods of ``Session``, which fire no event: :mod:`.legacy_bulk`;
- ``before_create`` of a table with a sum counter: configure the mappers
  first, so that the column has its final type.
- ``after_commit`` / ``after_soft_rollback``: inline folds of buffered
  counters, :mod:`.folding`;
- ``after_parent_attach`` of buffered counter columns (and, for a primary
  key declared after one, of every column): their deltas tables, :mod:`.buffer`.

:func:`install` runs when the first counter is declared, so that even a
process whose first ORM statement is a bulk one is seen. New write paths add
their registrations here (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapper, Session, configure_mappers

from . import association, buffer, bulk, flush, folding, legacy_bulk, readonly
from .counters import resolve_mapper, retry_failed, warn_database_cascades
from .plan import forget_plans

_installed = False
_child_mappers: set[Mapper[Any]] = set()
_watching_links = False


def install() -> None:
    """Register the mapper and Session hooks once (idempotent)."""
    global _installed
    if _installed:
        return
    event.listen(Mapper, "before_mapper_configured", _on_before_mapper_configured)
    event.listen(Mapper, "mapper_configured", _on_mapper_configured)
    event.listen(Mapper, "after_configured", warn_database_cascades)
    event.listen(Session, "before_flush", readonly.discard_assignments)
    event.listen(Session, "before_flush", flush.before_flush)
    event.listen(Session, "after_flush", flush.after_flush)
    event.listen(Session, "after_flush_postexec", flush.after_flush_postexec)
    event.listen(Session, "after_soft_rollback", flush.discard)
    event.listen(Session, "do_orm_execute", bulk.on_execute)
    event.listen(Session, "after_commit", folding.after_commit)
    flush.listen_with(_check_statements)
    event.listen(Session, "after_soft_rollback", folding.forget)
    legacy_bulk.install()
    _installed = True


def _check_statements(connection: sa.Connection) -> None:
    """Have :func:`.flush.statement_ran` see ``connection``'s statements (idempotent).

    Per connection, not per engine: only a flush that found a row gone pays
    for the check; the listener ends with the connection (one transaction of
    a Session).
    """
    if not event.contains(connection, "after_cursor_execute", flush.statement_ran):
        event.listen(connection, "after_cursor_execute", flush.statement_ran)


def _on_before_mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    retry_failed(mapper)


_watching_columns = False


def watch_buffered(column: sa.Column[Any]) -> None:
    """Build the deltas-table column of buffered counter ``column`` once it joins its table."""
    global _watching_columns
    event.listen(column, "after_parent_attach", buffer.attached)
    if not _watching_columns:
        event.listen(sa.Column, "after_parent_attach", buffer.any_column_attached)
        _watching_columns = True


def _on_mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    for counter in resolve_mapper(mapper):
        forget_plans()  # a new counter may change any cached write plan
        if counter.child_mapper is None:
            _watch_links()
        else:
            _watch_child(counter.child_mapper)
        _protect(counter.parent_mapper, counter.attr_key)


def _watch_links() -> None:
    """Follow the statements that write counted association tables (idempotent).

    Engine-wide, since the unit of work's writes reach no ORM event; the
    handlers return at once for statements on other tables or outside a
    flush or ``Session.execute``.
    """
    global _watching_links
    if _watching_links:
        return
    event.listen(Engine, "before_execute", association.before_execute, retval=True)
    event.listen(Engine, "after_execute", association.after_execute)
    event.listen(Mapper, "after_configured", association.after_configured)
    _watching_links = True


def _watch_child(child_mapper: Mapper[Any]) -> None:
    """Attach the per-row flush hooks to a child's hierarchy (idempotent).

    Once per hierarchy, on its base mapper and propagated to every subclass:
    hooks on a subclass too would fire twice for its rows.
    """
    base = child_mapper.base_mapper
    if base in _child_mappers:
        return
    _child_mappers.add(base)
    event.listen(base, "before_update", flush.before_update, propagate=True)
    event.listen(base, "before_delete", flush.before_delete, propagate=True)
    # raw/retval: the hook gets the InstanceState, without a wrapper call per inserted row.
    event.listen(base, "after_insert", flush.after_insert, propagate=True, raw=True, retval=True)
    event.listen(base, "after_update", flush.after_update, propagate=True)


def _protect(parent: Mapper[Any], attr_key: str) -> None:
    """Make a counter attribute read-only: no merge copies it, an assignment warns."""
    if readonly.protect(parent, attr_key):
        attr = parent.class_manager[attr_key]
        event.listen(attr, "set", readonly.warn_assignment, propagate=True)


def configure_before_create(column: sa.Column[Any]) -> None:
    """Configure the mappers before ``CREATE TABLE`` of ``column``'s table (a sum's final type)."""
    event.listen(column, "after_parent_attach", _configure_before_create)


def _configure_before_create(column: sa.Column[Any], table: Any) -> None:
    if isinstance(table, sa.Table) and not event.contains(table, "before_create", _configure):
        event.listen(table, "before_create", _configure)


def _configure(*args: Any, **kwargs: Any) -> None:
    configure_mappers()
