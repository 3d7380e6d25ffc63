"""The library's Hypothesis state machine over buffered counters, with folds as one more rule.

The machine's own invariant checks column + pending deltas (find_drift); this
test adds the test's own truth (buffered_models.drift), and checks the
columns alone right after each fold.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from buffered_models import Base, column_drift, drift
from hypothesis.stateful import invariant, rule

from alembic_counterfill import counters_of
from alembic_counterfill import fold as folding
from alembic_counterfill.testing import CounterStateMachine

pytestmark = pytest.mark.usefixtures("no_inline_folding")


class BufferedMachine(CounterStateMachine):
    base = Base
    url = ""

    def make_engine(self) -> sa.Engine:
        return sa.create_engine(self.url)

    @rule()
    def fold(self) -> None:
        # Commit first: either session's uncommitted unbuffered deltas hold
        # parent locks the fold would wait for (this test is single-threaded).
        self._commit(self.session)
        self._commit(self.stale)
        folding.fold(self.engine, counters_of(Base), chunk=2)
        assert column_drift(self.engine) == []

    @invariant()
    def independent_truth(self) -> None:
        if self.committed_state_readable():
            assert drift(self.engine) == []


@pytest.mark.parametrize("run_machine", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_random_orm_traffic_keeps_buffered_counters_exact(run_machine) -> None:  # noqa: ANN001
    run_machine(BufferedMachine, max_examples=15)
