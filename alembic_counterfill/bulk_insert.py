"""Bulk INSERT through ``Session.execute``: deltas from the parameters, or an exact recount.

The caller's statement always runs unchanged. Afterwards, for each counter:

- plain counts and sums whose FK and summed value are known per row (a literal
  parameter, or a column default that is a constant) get deltas from the
  parameters, coalesced per parent;
- counters with ``where=``, rows whose values the database computes, upserts
  (``ON CONFLICT`` / ``ON DUPLICATE KEY``) and ``INSERT … FROM SELECT`` recount
  the touched parents exactly, under the batch lock protocol. An upsert that
  may move existing rows also recounts the parents those rows had before.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState

from . import buffer, sql
from .counters import Counter
from .deltas import Recounts, chunks, lock_first, new_deltas, settle
from .plan import WritePlan

log = logging.getLogger(__name__)


class _Unknown:
    """A value only the database knows (SQL expression, server or callable default)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN: Any = _Unknown()


def _name(key: Any) -> Any:
    if isinstance(key, str):
        return key
    return getattr(key, "key", key)


def _value(value: Any) -> Any:
    if isinstance(value, sa.BindParameter) and value.callable is None:
        return value.value
    if isinstance(value, sa.ClauseElement):
        return UNKNOWN
    return value


def rows_of(state: ORMExecuteState, dml: Any) -> list[dict[Any, Any]]:
    """The inserted rows as ``{name: value}``, from parameters, ``values()`` or multi-VALUES."""
    fixed = {_name(k): v for k, v in (dml._values or {}).items()}
    if dml._multi_values:
        columns = [c.key for c in dml.table.columns]
        rows: list[dict[Any, Any]] = []
        for batch in dml._multi_values:
            for row in batch:
                if isinstance(row, dict):
                    rows.append({**fixed, **{_name(k): v for k, v in row.items()}})
                else:  # positional: table column order
                    rows.append({**fixed, **dict(zip(columns, row, strict=False))})
        return rows
    params: Any = state.parameters
    if isinstance(params, list):
        return [{**fixed, **row} for row in params] if fixed else params
    return [{**fixed, **(params or {})}]


def _default(column: sa.Column[Any]) -> Any:
    if column.server_default is not None:
        return UNKNOWN
    default = column.default
    if default is None:
        return None
    if getattr(default, "is_scalar", False):
        return default.arg  # type: ignore[attr-defined]
    return UNKNOWN


def column_values(plan: WritePlan, rows: list[dict[Any, Any]], column: sa.Column[Any]) -> list[Any]:
    try:
        attr = plan.mapper.get_property_by_column(column).key
    except sa.orm.exc.UnmappedColumnError:  # a column only Core statements can set
        attr = column.key
    names = list(dict.fromkeys([attr, column.key]))
    missing = _default(column)
    out: list[Any] = []
    for row in rows:
        for n in names:
            if n in row:
                v = row[n]
                out.append(_value(v) if isinstance(v, sa.ClauseElement) else v)
                break
        else:
            out.append(missing)
    return out


def _conflict_rows(
    state: ORMExecuteState, plan: WritePlan, dml: Any, rows: list[dict[Any, Any]]
) -> Any:
    """Lock and read the existing rows an upsert may update; ``None`` when they cannot be found."""
    clause = dml._post_values_clause
    target = getattr(clause, "inferred_target_elements", None)
    table = plan.table
    if target:
        key_sets = [[table.c[_name(t)] for t in target]]
    else:  # no explicit target: any unique key may conflict
        key_sets = [list(table.primary_key.columns)]
        key_sets += [
            list(c.columns) for c in table.constraints if isinstance(c, sa.UniqueConstraint)
        ]
        key_sets += [list(i.columns) for i in table.indexes if i.unique]
    found: list[Any] = []
    for cols in key_sets:
        values = list(zip(*[column_values(plan, rows, c) for c in cols], strict=True))
        if any(v is UNKNOWN for t in values for v in t):
            return None
        for part in chunks(sorted(set(values), key=repr)):
            where = (
                sa.tuple_(*cols).in_(part) if len(cols) > 1 else cols[0].in_([v[0] for v in part])
            )
            stmt = sql.matching_state(plan.counters, plan.pk_columns, where, lock=True)
            found += state.session.execute(stmt).all()
    return found


def _moves_existing(plan: WritePlan, dml: Any) -> bool:
    clause = getattr(dml, "_post_values_clause", None)
    if clause is None or type(clause).__name__.endswith("DoNothing"):
        return False
    sets = getattr(clause, "update_values_to_set", None)
    if sets is None:
        sets = getattr(clause, "update", None)
    if sets is None or plan.watched_names is None:
        return True
    names = {_name(k) for k in (sets.keys() if isinstance(sets, dict) else [k for k, _ in sets])}
    return bool(names & plan.watched_names)


def _selected_parents(state: ORMExecuteState, plan: WritePlan, dml: Any) -> dict[Counter, Any]:
    """For ``INSERT … FROM SELECT``: the distinct FK values the SELECT yields, per counter."""
    names = list(dml._select_names)
    sub = dml.select.subquery()
    out: dict[Counter, Any] = {}
    for counter in plan.counters:
        if counter.fk.key not in names:
            default = _default(counter.fk)
            out[counter] = (
                set() if default is None else ({default} if default is not UNKNOWN else UNKNOWN)
            )
            continue
        col = list(sub.c)[names.index(counter.fk.key)]
        params = state.parameters if isinstance(state.parameters, dict) else None
        out[counter] = {r[0] for r in state.session.execute(sa.select(col).distinct(), params)}
    return out


def _recounts(plan: WritePlan, rows: Any, counter: Counter) -> bool:
    """Whether a plain INSERT of ``rows`` recounts buffered ``counter`` (its parents exclusive).

    A ``where=`` counter, or a summed value only the database knows, is
    recounted; buffered counters otherwise only append deltas, and their
    parents are locked shared on InnoDB, as a flush does.
    """
    if not buffer.is_buffered(counter):
        return False
    if counter.where is not None:
        return True
    return counter.summed is not None and any(
        v is UNKNOWN for v in column_values(plan, rows, counter.summed)
    )


def run(state: ORMExecuteState, plan: WritePlan, dml: Any) -> Result[Any]:
    """Run the caller's INSERT and bring every counter it feeds up to date."""
    session = state.session
    recounts: Recounts = defaultdict(set)
    deltas = new_deltas()
    upsert = sql.may_skip_or_update(dml)
    lost: list[Counter] = []

    if dml.select is not None:
        parents = _selected_parents(state, plan, dml)
        lock_first(session, {c: ids for c, ids in parents.items() if ids is not UNKNOWN})
        result = state.invoke_statement()
        for counter, ids in parents.items():
            if ids is UNKNOWN:
                lost.append(counter)
            else:
                recounts[counter] |= ids
        settle(session, deltas, recounts)
        _warn(plan, lost)
        return result

    rows = rows_of(state, dml)
    if _moves_existing(plan, dml):
        existing = _conflict_rows(state, plan, dml, rows)
        if existing is None:
            lost.extend(plan.counters)
        else:
            for row in existing:  # the parents those rows count towards before the upsert
                for i, counter in enumerate(plan.counters):
                    recounts[counter].add(row._mapping[f"k{i}"])

    known = {c: set(column_values(plan, rows, c.fk)) - {UNKNOWN} for c in plan.counters}
    lock_first(
        session,
        {c: known[c] | recounts.get(c, set()) for c in plan.counters},
        shared_buffered=not upsert and not any(_recounts(plan, rows, c) for c in plan.counters),
    )
    result = state.invoke_statement()
    for counter in plan.counters:
        fks = column_values(plan, rows, counter.fk)
        if any(fk is UNKNOWN for fk in fks):
            lost.append(counter)
            continue
        exact = not upsert and counter.where is None
        if exact and counter.summed is None:
            per_parent: dict[Any, Any] = Tally(fk for fk in fks if fk is not None)
        elif exact and counter.summed is not None:
            per_parent = defaultdict(int)
            for fk, v in zip(fks, column_values(plan, rows, counter.summed), strict=True):
                if v is UNKNOWN:
                    exact = False
                    break
                if fk is not None and v:
                    per_parent[fk] += v
        if not exact:
            recounts[counter] |= {fk for fk in fks if fk is not None}
            continue
        for pid, d in per_parent.items():
            deltas[counter.parent_mapper][pid][counter] += d
    settle(session, deltas, recounts)
    _warn(plan, lost)
    return result


def _warn(plan: WritePlan, lost: Sequence[Counter]) -> None:
    if lost:
        log.warning(
            "counterfill: INSERT into %s: cannot tell which parents of %s it touched "
            "(values computed by the database); run `alembic counterfill verify --fix`",
            plan.table.name,
            ", ".join(sorted({c.key for c in lost})),
        )
