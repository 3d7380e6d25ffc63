"""Counter definitions as data: a canonical description and a fingerprint stable across processes.

A counter's *definition* is what its values mean: the parent table and
column, the child table and foreign key, the ``where=`` filter, the summed
column and the subclass filter of single-table inheritance. It is recorded in
the bookkeeping when a backfill is requested and when one completes, so a
changed definition is detected (autogenerate, ``alembic check``, ``status``)
and no worker recounts with a definition other than the one a run was
planned under.

What counts as a change: any of the parts above. The ``where=`` filter is
compared as SQL text compiled on one fixed dialect (SQLite's) with its
values inlined, so rewriting a lambda that produces the same SQL is no
change, while a different value (``likes > 10`` to ``likes > 5``) is. The
counter column's type, the Python class names and the lambda's source are
not part of the definition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

if TYPE_CHECKING:
    from .counters import Counter

#: The dialect every ``where=`` is compiled on, whatever database is in use.
_CANONICAL = sqlite.dialect()

#: Parts of a definition, in the order changes are described.
PARTS = ("counter", "child", "fk", "rows", "where", "sum")

_LABELS = {
    "counter": "counter column",
    "child": "child table",
    "fk": "target",
    "rows": "subclass filter",
    "where": "where",
    "sum": "sum",
}


def _table_name(table: sa.Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


def canonical_sql(expr: sa.ColumnElement[Any]) -> str:
    """``expr`` as SQL text on the canonical dialect, values inlined, whitespace collapsed."""
    try:
        text = str(expr.compile(dialect=_CANONICAL, compile_kwargs={"literal_binds": True}))
    except Exception:  # a value with no literal form: the SQL with its values listed after it
        compiled = expr.compile(dialect=_CANONICAL)
        values = sorted(f"{k}={v!r}" for k, v in compiled.params.items())
        text = f"{compiled} [{', '.join(values)}]"
    return " ".join(text.split())


def _subclass_filter(counter: Counter) -> str | None:
    """The discriminator filter of a single-table-inheritance child, or None."""
    mapper = counter.child_mapper
    if mapper is None:  # an association table: no mapped class, no subclass
        return None
    if not mapper.single or mapper.polymorphic_on is None or mapper.inherits is None:
        return None
    identities = sorted(
        repr(m.polymorphic_identity)
        for m in mapper.self_and_descendants
        if m.polymorphic_identity is not None
    )
    column = getattr(mapper.polymorphic_on, "name", str(mapper.polymorphic_on))
    return f"{column} IN ({', '.join(identities)})"


def definition(counter: Counter) -> dict[str, str | None]:
    """The parts of ``counter``'s definition, as plain strings (JSON-ready)."""
    return {
        "counter": f"{_table_name(counter.parent_table)}.{counter.name} "
        f"BY {counter.parent_pk.name}",
        "child": _table_name(counter.child_table),
        "fk": counter.fk.name,
        "rows": _subclass_filter(counter),
        "where": canonical_sql(counter.where) if counter.where is not None else None,
        "sum": _summed(counter),
    }


def _summed(counter: Counter) -> str | None:
    """The summed column's name, table-qualified when it is not the counting table's own.

    A joined subclass may sum a column of its own table while the FK lives in
    the base table: moving that column between tables changes the definition.
    Counting-table columns keep their bare name, so existing fingerprints hold.
    """
    summed = counter.summed
    if summed is None:
        return None
    if summed.table is counter.child_table:
        return summed.name
    return f"{_table_name(summed.table)}.{summed.name}"


def fingerprint_of(parts: Mapping[str, Any]) -> str:
    """A short hash of a definition's parts (the same in every process and SQLAlchemy version)."""
    text = json.dumps({k: parts.get(k) for k in PARTS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(counter: Counter) -> str:
    """The fingerprint of ``counter``'s current definition."""
    return fingerprint_of(definition(counter))


def encode(parts: Mapping[str, Any]) -> str:
    """A definition as the JSON text stored in the bookkeeping."""
    return json.dumps({k: parts.get(k) for k in PARTS}, sort_keys=True)


def decode(text: str | None) -> dict[str, Any] | None:
    """A stored definition back as a dict (None when none was recorded or it is unreadable)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between a recorded definition and the current one, one phrase per part.

    An unknown old definition (recorded without one) gives one generic phrase.
    """
    if old is None:
        return ["definition differs from the one recorded"]
    out = []
    for part in PARTS:
        if old.get(part) != new.get(part):
            out.append(f"{_LABELS[part]} {_show(old.get(part))} -> {_show(new.get(part))}")
    return out or ["definition differs from the one recorded"]


def fingerprints(counters: Mapping[str, Counter] | list[Counter]) -> dict[str, str]:
    """Fingerprint of each counter, by key."""
    items = counters.values() if isinstance(counters, Mapping) else counters
    return {c.key: fingerprint(c) for c in items}
