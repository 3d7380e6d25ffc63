"""``enqueue`` and ``verify`` commands (placeholder until the backfill engine lands)."""

from __future__ import annotations

from typing import Any


def register(group: Any) -> None:
    """Add the backfill commands to the ``counterfill`` click group."""
