"""Exact counter caches for SQLAlchemy, backfilled through Alembic and Dramatiq.

Public names load on first use: this package is imported by every
``import alembic`` (through its plugin entry point), which must stay cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actors import declare_actors
    from .columns import counter_cache
    from .counters import Counter, counters_of
    from .errors import (
        BrokerError,
        ConfigurationError,
        CounterDeclarationError,
        CounterfillError,
        CounterfillWarning,
        DatabaseError,
        DuplicateKeyError,
        ReinsertedRowError,
        UnknownCounterError,
    )
    from .folding import configure_folding
    from .pause import paused
    from .read import counter_value
    from .testing import assert_counters_consistent

__all__ = [
    # declaring counters
    "counter_cache",
    "Counter",
    "counters_of",
    # live maintenance
    "paused",
    "configure_folding",
    # reading during rollout
    "counter_value",
    # backfill workers in an app's own Dramatiq setup
    "declare_actors",
    # testing
    "assert_counters_consistent",
    # errors (one root: CounterfillError)
    "CounterfillError",
    "CounterDeclarationError",
    "ConfigurationError",
    "UnknownCounterError",
    "BrokerError",
    "DatabaseError",
    "DuplicateKeyError",
    "ReinsertedRowError",
    # warnings
    "CounterfillWarning",
]

_HOME = {
    "counter_cache": "columns",
    "Counter": "counters",
    "counters_of": "counters",
    "paused": "pause",
    "configure_folding": "folding",
    "counter_value": "read",
    "declare_actors": "actors",
    "assert_counters_consistent": "testing",
    "CounterfillError": "errors",
    "CounterDeclarationError": "errors",
    "ConfigurationError": "errors",
    "UnknownCounterError": "errors",
    "BrokerError": "errors",
    "DatabaseError": "errors",
    "CounterfillWarning": "errors",
    "DuplicateKeyError": "errors",
    "ReinsertedRowError": "errors",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
