"""Exact counter caches for SQLAlchemy, backfilled through Alembic and Dramatiq."""

from __future__ import annotations

from .counters import Counter, counters_of
from .declaration import counter_cache
from .errors import (
    BrokerError,
    ConfigurationError,
    CounterDeclarationError,
    CounterfillError,
    DatabaseError,
    UnknownCounterError,
)
from .pause import paused

__all__ = [
    # declaring
    "counter_cache",
    "Counter",
    "counters_of",
    # live maintenance
    "paused",
    # errors
    "CounterfillError",
    "CounterDeclarationError",
    "ConfigurationError",
    "UnknownCounterError",
    "BrokerError",
    "DatabaseError",
]
