"""Migration ops: ``op.request_counter_backfill()`` records that a counter needs a backfill.

An op is data (a :class:`~alembic.operations.MigrateOperation` with a
``reverse()``); executing it is a separate registration, and rendering it into
a revision file is a third one, in :mod:`.autogen`. Neither op backfills nor
talks to a broker: they only write the request rows, inside the migration's
transaction, so schema migration and data backfill stay decoupled.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations
from sqlalchemy.schema import CreateIndex, CreateTable

from . import progress

# A child of alembic's logger: alembic.ini's default logging shows it at INFO
# next to "Running upgrade ..." lines, where the next step should be read.
log = logging.getLogger("alembic.counterfill")

# Migration contexts (one per ``alembic upgrade --sql`` run) whose script
# already creates the bookkeeping tables: emit the DDL once, not once per op.
_ddl_emitted: weakref.WeakSet[Any] = weakref.WeakSet()


def counter_key(table_name: str, column_name: str) -> str:
    """The counter's key, ``"<table>.<column>"`` (the schema is not part of it)."""
    return f"{table_name}.{column_name}"


class _CounterRequestOp(MigrateOperation):
    """Shared data of the request op and its reverse: which counter column."""

    op_name = ""  # the op's name in migrations and diff tuples

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        schema: str | None = None,
        reason: Sequence[str] = (),
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.schema = schema
        # Why autogenerate proposed the op (rendered as comments; not executed).
        self.reason = list(reason)

    @property
    def key(self) -> str:
        """The counter's key, ``"<table>.<column>"``."""
        return counter_key(self.table_name, self.column_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key}>"

    def to_diff_tuple(self) -> tuple[Any, ...]:
        """How ``compare_metadata()`` and ``alembic check`` list this op."""
        return (self.op_name, self.schema, self.table_name, self.column_name)


@Operations.register_operation("request_counter_backfill")
class RequestCounterBackfillOp(_CounterRequestOp):
    """Record a counter column as pending: ``alembic counterfill enqueue`` will backfill it."""

    op_name = "request_counter_backfill"

    @classmethod
    def request_counter_backfill(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        schema: str | None = None,
    ) -> None:
        """Record that counter ``table_name.column_name`` needs a backfill (nothing is counted now).

        Writes a ``pending`` row into the library's bookkeeping tables, creating
        them if they are missing, in the migration's own transaction. Run
        ``alembic counterfill enqueue`` after deploying to fill the column.

        :param table_name: the parent table holding the counter column.
        :param column_name: the counter column.
        :param schema: the table's schema, if not the default one.
        """
        operations.invoke(cls(table_name, column_name, schema=schema))

    def reverse(self) -> _CounterRequestOp:
        """The downgrade: forget the request, or request again after a definition change.

        A redefined counter holds values of the new definition once its
        backfill ran: going back to the old definition needs a backfill too.
        """
        if self.reason:
            return RequestCounterBackfillOp(
                self.table_name,
                self.column_name,
                schema=self.schema,
                reason=["the previous definition needs a backfill again"],
            )
        return CancelCounterBackfillOp(self.table_name, self.column_name, schema=self.schema)


@Operations.register_operation("cancel_counter_backfill")
class CancelCounterBackfillOp(_CounterRequestOp):
    """Forget a counter's backfill request and state (the reverse of the request)."""

    op_name = "cancel_counter_backfill"

    @classmethod
    def cancel_counter_backfill(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        schema: str | None = None,
    ) -> None:
        """Remove what the library recorded for counter ``table_name.column_name``.

        :param table_name: the parent table holding the counter column.
        :param column_name: the counter column.
        :param schema: the table's schema, if not the default one.
        """
        operations.invoke(cls(table_name, column_name, schema=schema))

    def reverse(self) -> RequestCounterBackfillOp:
        """The reverse of forgetting is asking again."""
        return RequestCounterBackfillOp(
            self.table_name, self.column_name, schema=self.schema, reason=self.reason
        )


@Operations.implementation_for(RequestCounterBackfillOp)
def request_counter_backfill(operations: Operations, operation: RequestCounterBackfillOp) -> None:
    """Write the pending request, creating the bookkeeping tables first if needed.

    The definition recorded is the one of the models env.py hands to alembic
    (``target_metadata``): the code being deployed, which will backfill.
    """
    fingerprint, parts = _definition_of(operations, operation)
    statements = progress.request_statements(
        operation.key,
        operation.table_name,
        operation.column_name,
        operation.schema,
        fingerprint=fingerprint,
        definition=parts,
    )
    if operations.migration_context.as_sql:
        _emit_ddl(operations)
        # The script runs later than it is rendered: stamp it with the database's clock.
        statements = [
            stmt.values(requested_at=sa.func.now(), updated_at=sa.func.now())
            if isinstance(stmt, sa.Insert)
            else stmt
            for stmt in statements
        ]
    else:
        progress.ensure_tables(operations.get_bind())
    for statement in statements:
        _execute(operations, statement)
    log.info(
        "counter %s is pending: after deploying, run `alembic counterfill enqueue` to backfill it",
        operation.key,
    )


@Operations.implementation_for(CancelCounterBackfillOp)
def cancel_counter_backfill(operations: Operations, operation: CancelCounterBackfillOp) -> None:
    """Delete the counter's recorded row and end its unfinished run (nothing if none recorded)."""
    if not operations.migration_context.as_sql and not progress.has_tables(operations.get_bind()):
        return
    for statement in progress.unrequest_statements(operation.key):
        _execute(operations, statement)


def _definition_of(
    operations: Operations, operation: _CounterRequestOp
) -> tuple[str | None, str | None]:
    """(fingerprint, definition JSON) of the counter in env.py's models; Nones if not declared."""
    target = operations.migration_context.opts.get("target_metadata")
    metadatas = target if isinstance(target, list | tuple) else [target]
    from sqlalchemy.orm import configure_mappers

    from . import definition
    from .declaration import spec_of

    for metadata in metadatas:
        if not isinstance(metadata, sa.MetaData):
            continue
        for table in metadata.tables.values():
            if table.name != operation.table_name:
                continue
            column = table.columns.get(operation.column_name)
            spec = spec_of(column) if column is not None else None
            if spec is None:
                continue
            configure_mappers()
            if spec.resolved is None:
                continue
            parts = definition.definition(spec.resolved)
            return definition.fingerprint_of(parts), definition.encode(parts)
    return None, None


def _emit_ddl(operations: Operations) -> None:
    context = operations.migration_context
    if context in _ddl_emitted:
        return
    # MySQL 8 has no CREATE INDEX IF NOT EXISTS; InnoDB indexes every
    # foreign-key column itself, which is the only index the tables declare.
    innodb = context.dialect.name in ("mysql", "mariadb")
    for table in progress.bookkeeping.sorted_tables:
        operations.execute(CreateTable(table, if_not_exists=True))
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)) if not innodb else ():
            operations.execute(CreateIndex(index, if_not_exists=True))
    _ddl_emitted.add(context)


def _execute(operations: Operations, statement: Any) -> None:
    context = operations.migration_context
    if not context.as_sql:
        operations.execute(statement)
        return
    # Offline scripts must be plain SQL whether or not env.py passed literal_binds=True:
    # render the values inline here, on the named paramstyle, and write the text as
    # alembic writes its own statements. (Going through text() and op.execute()
    # would double every "%" in a value on "format" dialects such as PostgreSQL's.)
    dialect = cast(Any, type(context.dialect))(paramstyle="named")
    sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    impl = context.impl
    impl.static_output(sql.replace("\t", "    ").strip() + impl.command_terminator)
