"""The library's Hypothesis state machine over random ORM traffic, checked against its own truth.

After every commit the machine checks counters with the drift helper; this test
adds a second, independent check with the test's own GROUP BY queries.
"""

from __future__ import annotations

import pytest
from social import Base, SocialMachine

from alembic_counterfill.testing import CounterStateMachine


def test_random_orm_traffic_keeps_counters_exact(run_machine) -> None:  # noqa: ANN001
    run_machine(SocialMachine, max_examples=10)


def test_machine_requires_make_engine() -> None:
    class Incomplete(CounterStateMachine):
        base = Base

    with pytest.raises(NotImplementedError, match="make_engine"):
        Incomplete()
