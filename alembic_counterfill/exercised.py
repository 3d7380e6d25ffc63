"""What a state-machine run really exercised, per counter: inserts, moves, flips, sum changes.

A random test can pass without testing anything (every insert rolled back,
every flip writing the value the row already had). :class:`Exercised` tallies
the effects that reached a commit, judged from the database (the row's state
read before and after each write, not the session's copy), and
:meth:`Exercised.check` fails a run that did too little, naming what was
missing and how to fix it.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import Any

#: Effect kinds, per counter key.
INSERTED = "inserted"
DELETED = "deleted"
MOVED = "moved"
FLIPPED = "flipped"
SUMMED = "sum changed"
NONZERO = "non-zero at commit"
#: Effect kinds for the whole run (key ``"*"``).
STALE = "stale-session write"
BULK = "bulk statement"
EMPTY_COMMIT = "commit with nothing to commit"
ROLLED_BACK = "rolled-back write"

#: Why a kind may be missing, and what to do about it.
_HINTS = {
    INSERTED: "override make_child() so that children can be inserted",
    NONZERO: "override make_child() so that inserted children count (where= true, sum non-zero)",
    MOVED: "the parent needs at least two rows: check make_parent()",
    FLIPPED: "the where= column must be a Boolean or Integer column the machine can write",
    SUMMED: "the summed column must be an Integer or Numeric column the machine can write",
    DELETED: "children must be deletable (check ON DELETE rules)",
    STALE: "run more steps (stateful_step_count)",
}


def bucket(n: int) -> str:
    """A coarse range for ``n``, so Hypothesis statistics group examples readably."""
    if n == 0:
        return "0"
    if n < 5:
        return "1-4"
    if n < 20:
        return "5-19"
    return "20+"


class Exercised:
    """Totals over the examples of one run; ``required`` lists the (key, kind) that must occur."""

    def __init__(self) -> None:
        self.examples = 0
        self.totals: Tally[tuple[str, str]] = Tally()
        self.required: set[tuple[str, str]] = set()
        #: Counters whose children are parents too (self-referential or chained):
        #: their deletes are refused by the children's own rows most of the time.
        self.kept_by_own_children: set[str] = set()

    def add_example(self, tally: Mapping[tuple[str, str], int]) -> None:
        """Add one finished example's tally."""
        self.examples += 1
        self.totals.update(tally)

    def require(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Demand these (counter key, kind) pairs in :meth:`check`."""
        self.required.update(pairs)

    def _share(self, key: str, kind: str) -> float:
        """The share of the per-example minimum that ``kind`` must reach on counter ``key``."""
        if kind != DELETED:
            return 1.0
        # Deletes fail by nature: a row that other rows point at is kept by their
        # FKs. A child that is itself a parent (users.referrer_id) is kept most of
        # the time, so random runs land anywhere between 0.3 and 1 per example.
        return 0.2 if key in self.kept_by_own_children else 0.5

    def report(self) -> str:
        """One line per (key, kind): the total and the mean per example."""
        n = max(self.examples, 1)
        lines = [f"{self.examples} example(s):"]
        for (key, kind), total in sorted(self.totals.items()):
            lines.append(f"  {key} {kind}: {total} ({total / n:.1f} per example)")
        return "\n".join(lines)

    def check(self, per_example: float = 1.0, extra: Mapping[tuple[str, str], float] = {}) -> None:
        """Raise AssertionError unless each required pair occurred often enough per example.

        :param per_example: the minimum mean per example of every required pair.
        :param extra: further (key, kind) pairs with their own minimum mean per example.
        """
        if self.examples == 0:
            raise AssertionError("the state machine ran no example")
        wants = {pair: per_example * self._share(*pair) for pair in self.required}
        wants.update(extra)
        missing = []
        for (key, kind), mean in sorted(wants.items()):
            need = math.ceil(mean * self.examples)
            got = self.totals[(key, kind)]
            if got < need:
                hint = _HINTS.get(kind, "run more steps")
                missing.append(f"  {key} {kind}: {got}, need {need} ({hint})")
        if missing:
            raise AssertionError(
                "the state machine exercised too little to prove anything:\n"
                + "\n".join(missing)
                + "\n"
                + self.report()
            )


def example_tally() -> Tally[tuple[str, str]]:
    """An empty per-example tally (a ``collections.Counter`` keyed by (key, kind))."""
    return Tally()


def effects(
    key: str, before: tuple[Any, ...] | None, after: tuple[Any, ...] | None
) -> list[tuple[str, str]]:
    """The effects on counter ``key`` of one row going from ``before`` to ``after``.

    Each state is ``(fk, where, summed)`` as read from the database, ``None``
    when the row does not exist.
    """
    if before is None and after is None:
        return []
    if before is None:
        return [(key, INSERTED)]
    if after is None:
        return [(key, DELETED)]
    found = []
    if before[0] != after[0]:
        found.append((key, MOVED))
    if before[1] != after[1]:
        found.append((key, FLIPPED))
    if before[2] != after[2]:
        found.append((key, SUMMED))
    return found
