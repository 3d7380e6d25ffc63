"""Alembic plugin entry point (placeholder until the counter ops and CLI hook land).

Alembic imports this module on every ``import alembic``: it must stay light.
"""

from __future__ import annotations

from typing import Any


def setup(plugin: Any) -> None:
    """Register what the plugin provides (nothing yet)."""
