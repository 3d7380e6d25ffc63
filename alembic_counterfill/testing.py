"""Helpers for users' own tests: a drift assertion and a Hypothesis state machine over their models.

``assert_counters_consistent`` recomputes every counter with its own correlated
COUNT/SUM (independent of the backfill SQL it checks).
``CounterStateMachine`` drives random ORM traffic against the user's models and
asserts after every commit that every counter equals the truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .consistency import Drift, assert_counters_consistent, find_drift

if TYPE_CHECKING:
    from .machine import CounterStateMachine

__all__ = ["Drift", "assert_counters_consistent", "find_drift", "CounterStateMachine"]


def __getattr__(name: str) -> Any:
    # The state machine needs Hypothesis (a test-time dependency): import it on first use.
    if name == "CounterStateMachine":
        from .machine import CounterStateMachine

        return CounterStateMachine
    raise AttributeError(name)
