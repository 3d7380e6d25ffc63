"""Helpers for users' own tests: a drift assertion and a Hypothesis state machine over their models.

``assert_counters_consistent`` recomputes every counter with its own correlated
COUNT/SUM (independent of the backfill SQL it checks).
``CounterStateMachine`` drives random ORM traffic against the user's models and
asserts after every commit that every counter equals the truth;
``run_counter_machine`` runs it and fails a run that exercised too little.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .consistency import Drift, assert_counters_consistent, find_drift

if TYPE_CHECKING:
    from .machine import CounterStateMachine, run_counter_machine

__all__ = [
    "Drift",
    "assert_counters_consistent",
    "find_drift",
    "CounterStateMachine",
    "run_counter_machine",
]


def __getattr__(name: str) -> Any:
    # The state machine needs Hypothesis (a test-time dependency): import it on first use.
    if name in ("CounterStateMachine", "run_counter_machine"):
        from . import machine

        return getattr(machine, name)
    raise AttributeError(name)
