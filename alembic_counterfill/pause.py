"""Pause live counter maintenance for a block of code (bulk loads that a backfill will fix)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_paused: ContextVar[bool] = ContextVar("counterfill_paused", default=False)


@contextmanager
def paused() -> Iterator[None]:
    """Skip live counter deltas for ORM writes made inside the ``with`` block.

    The pause is per thread / asyncio task (a context variable), so other
    requests keep their counters exact. Counters touched inside the block drift
    until ``alembic counterfill enqueue --all`` or ``verify --fix`` repairs them.
    """
    token = _paused.set(True)
    try:
        yield
    finally:
        _paused.reset(token)


def is_paused() -> bool:
    """Whether live maintenance is paused in the current context."""
    return _paused.get()
