"""The library's Hypothesis state machine over random ORM traffic, checked against its own truth.

After every commit the machine checks counters with the drift helper; this test
adds a second, independent check with the test's own GROUP BY queries.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis.stateful import invariant
from social import Base, User, assert_exact

from alembic_counterfill.testing import CounterStateMachine


class SocialMachine(CounterStateMachine):
    base = Base
    url = ""

    def make_engine(self) -> sa.Engine:
        return sa.create_engine(self.url)

    def make_parent(self, cls: type) -> object:
        return cls(name="h")

    @invariant()
    def independent_truth(self) -> None:
        if not self.committed_state_readable():
            return
        assert_exact(self.engine)


def test_random_orm_traffic_keeps_counters_exact(run_machine) -> None:  # noqa: ANN001
    run_machine(SocialMachine, max_examples=20)


def test_machine_requires_make_engine() -> None:
    class Incomplete(CounterStateMachine):
        base = Base

    with pytest.raises(NotImplementedError, match="make_engine"):
        Incomplete()


def test_users_exist_in_models() -> None:
    assert User.__tablename__ == "users"
