"""Planted bugs for ``bench/mutation_check.py``: a pytest plugin that patches the library.

``COUNTERFILL_MUTATION=<name> pytest -p mutants ...`` applies one mutation
before any test runs; without the variable nothing is patched. Each mutation
is a semantic bug the suite must catch (see docs/testing.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _no_for_update() -> None:
    """Every SELECT ... FOR UPDATE / FOR NO KEY UPDATE loses its lock clause."""
    from sqlalchemy.sql.selectable import GenerativeSelect

    GenerativeSelect.with_for_update = lambda self, *a, **k: self  # type: ignore[method-assign]


def _redact_nothing() -> None:
    """URLs are shown with their passwords."""
    import alembic_counterfill.urls as urls

    def identity(url: str) -> str:
        return url

    for module in ("urls", "actors", "config", "cli", "cli_backfill"):
        mod = __import__(f"alembic_counterfill.{module}", fromlist=["x"])
        if hasattr(mod, "redact"):
            mod.redact = identity
    urls.redact = identity


def _no_parent_prelock() -> None:
    """Parents are not locked in key order before the delta UPDATE (deadlock-prone)."""
    from alembic_counterfill import deltas, sql

    real = sql.lock_parents

    def no_lock(table: Any, pk: Any, lo: Any, hi: Any, **kw: Any) -> Any:
        stmt = real(table, pk, lo, hi, **kw)
        return stmt.where(False) if kw.get("ids") is not None else stmt

    deltas.sql.lock_parents = no_lock  # type: ignore[attr-defined]


def _bulk_unlocked_pre_read() -> None:
    """A bulk DELETE takes its deltas from an unlocked read made before it runs unrestricted."""
    from alembic_counterfill import bulk_modify

    def pre_read_delete(state: Any, plan: Any, dml: Any, one_writer: bool) -> Any:
        old = bulk_modify._lock_matching(state, plan, dml, lock=False)
        result = state.invoke_statement()
        deltas = bulk_modify.new_deltas()
        bulk_modify.add_rows(deltas, plan, old, -1)
        bulk_modify.settle(state.session, deltas)
        return result

    bulk_modify._delete_returning = pre_read_delete  # type: ignore[assignment]


def _ignore_value_columns() -> None:
    """Changes of where= and sum= columns are not seen (only FK moves, inserts, deletes)."""
    from alembic_counterfill.counters import Counter

    Counter.value_columns = lambda self: []  # type: ignore[method-assign]


def _old_state_from_session() -> None:
    """The old parent of a flushed child is the session's copy's, not the database's."""
    from collections import namedtuple

    import sqlalchemy as sa
    from sqlalchemy.orm.util import identity_key

    from alembic_counterfill import flush

    real = flush._read

    def from_copy(connection: Any, plan: Any, keys: Any, *, lock: bool) -> list[Any]:
        rows = real(connection, plan, keys, lock=lock)
        if not lock or not rows or not _sessions:
            return rows
        session, n = _sessions[0], len(plan.pk_columns)
        # A Row stand-in: positional, by name and by ``_mapping`` like the real one
        # (so the run fails for the planted bug, not for the row's shape).
        base = namedtuple("Row", rows[0]._fields)  # type: ignore[misc]
        shape = type("Row", (base,), {"_mapping": property(lambda r: r._asdict())})
        out = []
        for row in rows:
            values = list(row)
            ident = identity_key(plan.mapper.class_, tuple(row[:n]))
            obj = session.identity_map.get(ident)
            if obj is not None:
                committed = sa.inspect(obj).committed_state
                for i, counter in enumerate(plan.counters):
                    key = plan.mapper.get_property_by_column(counter.fk).key
                    if key in committed:  # the value the session loaded, however old
                        values[row._fields.index(f"k{i}")] = committed[key]
            out.append(shape(*values))
        return out

    flush._read = from_copy  # type: ignore[assignment]

    @sa.event.listens_for(sa.orm.Session, "before_flush")
    def remember(session: Any, *args: Any) -> None:
        _sessions[:] = [session]


_sessions: list[Any] = []


MUTATIONS: dict[str, Callable[[], None]] = {
    "no_for_update": _no_for_update,
    "redact_nothing": _redact_nothing,
    "no_parent_prelock": _no_parent_prelock,
    "bulk_unlocked_pre_read": _bulk_unlocked_pre_read,
    "ignore_value_columns": _ignore_value_columns,
    "old_state_from_session": _old_state_from_session,
}


def pytest_configure(config: Any) -> None:
    name = os.environ.get("COUNTERFILL_MUTATION")
    if name:
        MUTATIONS[name]()
