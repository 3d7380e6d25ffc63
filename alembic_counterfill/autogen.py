"""Autogenerate support: request a backfill for each added counter column; hide our own tables.

The comparator runs last in alembic's ``"schema"`` comparison, when
``upgrade_ops`` already holds what alembic found. It edits that list: after
the operations that add a counter column to an existing table it puts a
:class:`~.ops.RequestCounterBackfillOp`, and it drops whatever alembic
proposed for the library's bookkeeping tables (they live in the app's
database but not in the app's models). Counters of newly created tables need
no backfill: an empty table's counters are exact from the start.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.operations import ops as alembic_ops
from alembic.util import PriorityDispatchResult

from .declaration import spec_of
from .ops import CancelCounterBackfillOp, RequestCounterBackfillOp
from .progress import TABLE_NAMES


def hide_bookkeeping(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> Any:
    """Keep alembic from reflecting the bookkeeping tables at all (no "removed table" noise).

    Uses the context's list of ``include_name`` filters, which alembic keeps
    in a private attribute; if that changes, :func:`compare` still removes
    the ops, only the log lines come back.
    """
    filters = getattr(autogen_context, "_name_filters", None)
    if isinstance(filters, list) and _skip_bookkeeping not in filters:
        filters.append(_skip_bookkeeping)
    return PriorityDispatchResult.CONTINUE


def _skip_bookkeeping(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name in TABLE_NAMES)


def compare(autogen_context: Any, upgrade_ops: alembic_ops.UpgradeOps, schemas: Any) -> Any:
    """Edit ``upgrade_ops`` in place: add backfill requests, remove bookkeeping-table ops."""
    edited: list[alembic_ops.MigrateOperation] = []
    for op in upgrade_ops.ops:
        if _is_bookkeeping(op):
            continue
        edited.append(op)
        if isinstance(op, alembic_ops.ModifyTableOps):
            edited.extend(_requests_for(op))
    upgrade_ops.ops[:] = edited
    return PriorityDispatchResult.CONTINUE


def _is_bookkeeping(op: alembic_ops.MigrateOperation) -> bool:
    table_name = getattr(op, "table_name", None)
    return (
        isinstance(
            op,
            alembic_ops.CreateTableOp | alembic_ops.DropTableOp | alembic_ops.ModifyTableOps,
        )
        and table_name in TABLE_NAMES
    )


def _requests_for(container: alembic_ops.ModifyTableOps) -> list[RequestCounterBackfillOp]:
    requests = []
    for op in container.ops:
        # AddColumnOp carries the metadata Column itself, and with it the counter's spec.
        if isinstance(op, alembic_ops.AddColumnOp) and spec_of(op.column) is not None:
            requests.append(
                RequestCounterBackfillOp(op.table_name, op.column.name, schema=op.schema)
            )
    return requests


def _render(prefix_name: str, autogen_context: Any, op: Any) -> str:
    args = [repr(op.table_name), repr(op.column_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    prefix = autogen_context.opts.get("alembic_module_prefix") or ""
    return f"{prefix}{prefix_name}({', '.join(args)})"


@renderers.dispatch_for(RequestCounterBackfillOp)
def render_request(autogen_context: Any, op: RequestCounterBackfillOp) -> str:
    """Render ``op.request_counter_backfill('table', 'column')`` into a revision file."""
    return _render("request_counter_backfill", autogen_context, op)


@renderers.dispatch_for(CancelCounterBackfillOp)
def render_cancel(autogen_context: Any, op: CancelCounterBackfillOp) -> str:
    """Render ``op.cancel_counter_backfill('table', 'column')`` (the downgrade)."""
    return _render("cancel_counter_backfill", autogen_context, op)
