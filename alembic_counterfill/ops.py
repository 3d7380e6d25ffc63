"""Migration ops: ``op.request_counter_backfill()`` records that a counter needs a backfill.

An op is data (a :class:`~alembic.operations.MigrateOperation` with a
``reverse()``); executing it is a separate registration, and rendering it into
a revision file is a third one, in :mod:`.autogen`. Neither op backfills nor
talks to a broker: they only write the request rows, inside the migration's
transaction, so schema migration and data backfill stay decoupled.
"""

from __future__ import annotations

import weakref
from typing import Any

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations
from sqlalchemy.schema import CreateIndex, CreateTable

from . import progress

# Migration contexts (one per ``alembic upgrade --sql`` run) whose script
# already creates the bookkeeping tables: emit the DDL once, not once per op.
_ddl_emitted: weakref.WeakSet[Any] = weakref.WeakSet()


def counter_key(table_name: str, column_name: str) -> str:
    """The counter's key, ``"<table>.<column>"`` (the schema is not part of it)."""
    return f"{table_name}.{column_name}"


class _CounterRequestOp(MigrateOperation):
    """Shared data of the request op and its reverse: which counter column."""

    op_name = ""  # the op's name in migrations and diff tuples

    def __init__(self, table_name: str, column_name: str, *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.schema = schema

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

    def reverse(self) -> CancelCounterBackfillOp:
        """The downgrade: forget the request."""
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
        return RequestCounterBackfillOp(self.table_name, self.column_name, schema=self.schema)


@Operations.implementation_for(RequestCounterBackfillOp)
def request_counter_backfill(operations: Operations, operation: RequestCounterBackfillOp) -> None:
    """Write the pending request, creating the bookkeeping tables first if needed."""
    statements = progress.request_statements(
        operation.key, operation.table_name, operation.column_name, operation.schema
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


@Operations.implementation_for(CancelCounterBackfillOp)
def cancel_counter_backfill(operations: Operations, operation: CancelCounterBackfillOp) -> None:
    """Delete the counter's recorded row (nothing to do when no request was ever recorded)."""
    if not operations.migration_context.as_sql and not progress.has_tables(operations.get_bind()):
        return
    _execute(operations, progress.unrequest_statement(operation.key))


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
    # render the values inline here; escaping ":" keeps text() from seeing bind names.
    sql = str(statement.compile(dialect=context.dialect, compile_kwargs={"literal_binds": True}))
    operations.execute(sa.text(sql.replace(":", "\\:")))
