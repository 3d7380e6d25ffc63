"""The library's Hypothesis state machine, pointed at the example's models as a user would.

Random ORM traffic (new users, follows, posts; moves, publish flips, deletes,
stale sessions, rollbacks) must keep all three counters exact. Besides the
machine's own check after every commit, an invariant here recounts with the
test's own COUNT(*) queries.
"""

from __future__ import annotations

import itertools
from typing import Any

import sqlalchemy as sa
from hypothesis.stateful import invariant
from test_example_demo import counter_mismatches

from alembic_counterfill.testing import CounterStateMachine
from example_project.models import Base, Post

_names = itertools.count(1)


class ExampleMachine(CounterStateMachine):
    """What a user of the example app writes: the base, an engine, and required fields."""

    base = Base
    url = ""

    def make_engine(self) -> sa.Engine:
        url = sa.make_url(self.url)
        if url.get_backend_name() != "postgresql":
            return sa.create_engine(url)
        # Both sessions live in this one thread: a write waiting on a lock the
        # other session holds would hang the suite; a lock timeout fails it instead.
        options = f"{url.query.get('options', '')} -c lock_timeout=1s".strip()
        return sa.create_engine(url, connect_args={"options": options})

    def make_parent(self, cls: type) -> Any:
        # usernames are unique and required; the counters start at their default 0
        return cls(username=f"member{next(_names)}")

    def make_child(self, cls: type, values: dict[str, Any]) -> Any:
        if cls is Post:
            values = {"title": "hello", "published": False, **values}
        return cls(**values)

    @invariant()
    def counters_equal_an_independent_count(self) -> None:
        if not self.committed_state_readable():
            return
        assert counter_mismatches_or_empty(self.engine) == []


def counter_mismatches_or_empty(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        if not conn.execute(sa.text("select count(*) from users")).scalar():
            return []
    return counter_mismatches(engine)


def test_random_orm_traffic_keeps_the_example_counters_exact(run_machine) -> None:  # noqa: ANN001
    run_machine(ExampleMachine, max_examples=10)
