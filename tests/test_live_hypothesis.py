"""The library's Hypothesis state machine over random ORM traffic, checked against its own truth.

After every commit the machine checks counters with the drift helper; this test
adds a second, independent check with the test's own GROUP BY queries.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, run_state_machine_as_test
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
        if self.engine.dialect.name == "sqlite" and (
            self.session.in_transaction() or self.stale.in_transaction()
        ):
            return
        assert_exact(self.engine)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_random_orm_traffic_keeps_counters_exact(backend: str, request) -> None:  # noqa: ANN001
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    machine = type("Machine", (SocialMachine,), {"url": url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_machine_requires_make_engine() -> None:
    class Incomplete(CounterStateMachine):
        base = Base

    with pytest.raises(NotImplementedError, match="make_engine"):
        Incomplete()


def test_users_exist_in_models() -> None:
    assert User.__tablename__ == "users"
