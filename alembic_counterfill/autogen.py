"""Autogenerate support: request backfills for added or redefined counters; hide our own tables.

The comparator runs last in alembic's ``"schema"`` comparison, when
``upgrade_ops`` already holds what alembic found. It edits that list: after
the operations that add a counter column to an existing table it puts a
:class:`~.ops.RequestCounterBackfillOp`; for a counter whose definition
differs from the one recorded in the database it adds a request with a
comment naming what changed; before dropping a counter column (or for a
recorded counter the models no longer declare) it puts a
:class:`~.ops.CancelCounterBackfillOp`; and it drops whatever alembic
proposed for the library's bookkeeping tables (they live in the app's
database but not in the app's models). Counters of newly created tables need
no backfill: an empty table's counters are exact from the start.

The models' mappers are configured first, so a declaration mistake fails
``alembic revision --autogenerate`` instead of rendering a counter that
cannot work.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import renderers
from alembic.operations import ops as alembic_ops
from alembic.util import PriorityDispatchResult

from . import definition
from . import progress as p
from .counters import Counter, counters_of
from .declaration import spec_of
from .ops import CancelCounterBackfillOp, RequestCounterBackfillOp, counter_key
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
    """Edit ``upgrade_ops`` in place: add backfill requests and cancels, remove bookkeeping ops."""
    declared = _declared(autogen_context)
    recorded = _recorded(autogen_context)
    edited: list[alembic_ops.MigrateOperation] = []
    added: set[str] = set()
    cancelled: set[str] = set()
    for op in upgrade_ops.ops:
        if _is_bookkeeping(op):
            continue
        # Cancel before the drop, so the downgrade adds the column, then requests.
        for key in _dropped_keys(op, recorded):
            if key not in declared:
                edited.append(_cancel(recorded[key], "removed from the models"))
                cancelled.add(key)
        edited.append(op)
        if isinstance(op, alembic_ops.ModifyTableOps):
            requests = _requests_for(op)
            added.update(r.key for r in requests)
            edited.extend(requests)
        elif isinstance(op, alembic_ops.CreateTableOp):
            added.update(
                counter_key(op.table_name, c.name) for c in op.columns if isinstance(c, sa.Column)
            )
    # Without models to compare (no target_metadata), nothing says a counter was removed.
    known = bool(_metadatas(autogen_context))
    for key, row in sorted(recorded.items()):
        if known and key not in declared and key not in cancelled:
            edited.append(_cancel(row, "no longer declared in the models"))
    for key, counter in sorted(declared.items()):
        row = recorded.get(key)
        if key in added or row is None or row["fingerprint"] is None:
            continue
        current = definition.definition(counter)
        if definition.fingerprint_of(current) != row["fingerprint"]:
            old = definition.decode(row["definition"])
            edited.append(
                RequestCounterBackfillOp(
                    counter.parent_table.name,
                    counter.name,
                    schema=counter.parent_table.schema,
                    reason=[
                        f"{key} changed: {change}" for change in definition.changes(old, current)
                    ],
                )
            )
    upgrade_ops.ops[:] = edited
    return PriorityDispatchResult.CONTINUE


def _metadatas(autogen_context: Any) -> list[sa.MetaData]:
    target = getattr(autogen_context, "metadata", None)
    targets = target if isinstance(target, list | tuple) else [target]
    return [m for m in targets if isinstance(m, sa.MetaData)]


def _declared(autogen_context: Any) -> dict[str, Counter]:
    """Counters of the models alembic compares, by key; configures the mappers (errors raise)."""
    found: dict[str, Counter] = {}
    for metadata in _metadatas(autogen_context):
        found.update((c.key, c) for c in counters_of(metadata))
    return found


def _recorded(autogen_context: Any) -> dict[str, Any]:
    """The bookkeeping rows of the database alembic compares against (empty offline)."""
    connection = getattr(autogen_context, "connection", None)
    if connection is None:
        return {}
    return p.counter_rows(connection)


def _dropped_keys(op: alembic_ops.MigrateOperation, recorded: dict[str, Any]) -> list[str]:
    """Recorded counter keys whose column (or table) ``op`` drops."""
    if isinstance(op, alembic_ops.DropTableOp):
        return sorted(k for k, r in recorded.items() if r["table_name"] == op.table_name)
    if isinstance(op, alembic_ops.ModifyTableOps):
        return [
            counter_key(inner.table_name, inner.column_name)
            for inner in op.ops
            if isinstance(inner, alembic_ops.DropColumnOp)
            and counter_key(inner.table_name, inner.column_name) in recorded
        ]
    return []


def _cancel(row: Any, why: str) -> CancelCounterBackfillOp:
    return CancelCounterBackfillOp(
        row["table_name"],
        row["column_name"],
        schema=row["schema_name"],
        reason=[f"{row['key']} {why}: end its backfill and forget its state"],
    )


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


def _render(prefix_name: str, autogen_context: Any, op: Any) -> list[str]:
    args = [repr(op.table_name), repr(op.column_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    prefix = autogen_context.opts.get("alembic_module_prefix") or ""
    comments = ["# " + " ".join(line.split()) for line in op.reason]
    return [*comments, f"{prefix}{prefix_name}({', '.join(args)})"]


@renderers.dispatch_for(RequestCounterBackfillOp)
def render_request(autogen_context: Any, op: RequestCounterBackfillOp) -> list[str]:
    """Render ``op.request_counter_backfill('table', 'column')`` (with why, as comments)."""
    return _render("request_counter_backfill", autogen_context, op)


@renderers.dispatch_for(CancelCounterBackfillOp)
def render_cancel(autogen_context: Any, op: CancelCounterBackfillOp) -> list[str]:
    """Render ``op.cancel_counter_backfill('table', 'column')`` (with why, as comments)."""
    return _render("cancel_counter_backfill", autogen_context, op)
