"""Adaptive batch size: a pure controller choosing the next transaction's size from measured ones.

Like GitLab's batch optimizer, the next size aims at a target transaction
duration from a weighted history of measurements (recent ones weigh more);
growth is capped per step (one fast outlier must not make the next
transaction huge) while shrinking is not (one slow transaction is a reason to
back off at once), and the result stays within bounds.

Unlike a plain rows-per-second estimate, the history is fitted as
``seconds = fixed + per_parent * parents``: every transaction pays a fixed
cost (round trips, commit), and when that cost alone approaches the target,
shrinking would only make the backfill slower without making transactions
shorter. The controller then settles where the fixed cost is half of each
transaction. No clock, no database: callers pass what they measured.

Two targets: a short one while application sessions wait on the run's locks
(``contended``, reported by the caller from the database's signals), and a
longer one while nobody does, so a backfill with no concurrent writers to
protect is not slowed down by transactions sized for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

#: Default target duration of one batch transaction (seconds): short enough
#: that an application write waiting on a batch's row locks is not noticed
#: (bench/impact.py: p99 +21 ms with 0.03 s, +45 to +78 ms with 0.1 s). When
#: the fixed cost of a transaction exceeds half of it, sizes settle at twice
#: the fixed cost instead (see ideal_size).
TARGET_SECONDS = 0.03

#: Default target duration while no application session has waited on the
#: run's locks lately (seconds): with nobody to protect, bigger transactions
#: pay the fixed cost of each less often (bench/backfill.py), so sizes grow
#: to the planned range unless a piece nears a second (on a loaded machine
#: 10,000 parents took 0.2-0.6 s, which 0.25 s kept cutting in four). The
#: first session found waiting switches the run to TARGET_SECONDS (see
#: contended).
IDLE_TARGET_SECONDS = 1.0

#: Seconds a run stays at the short target after a session waited on its
#: locks (or a piece could not get its own): contention comes in bursts.
CONTENDED_SECONDS = 60.0

#: Default bounds of an adaptive batch (parents) and the first size tried.
MIN_SIZE = 100
START_SIZE = 1_000

#: Largest factor a batch may grow by from one transaction to the next.
MAX_GROWTH = 1.2

#: The same while nobody waits on the run's locks: overshooting the idle
#: target hurts no one, and each extra transaction costs its fixed cost (at
#: 1.2 a 109,100-parent backfill spent most of its pieces growing).
IDLE_GROWTH = 2.0

#: Weight kept by older measurements at each new one (recent ones weigh more).
DECAY = 0.8

#: Factor a batch shrinks by when the database asks us to back off.
BACKOFF_SHRINK = 0.5


@dataclass(frozen=True)
class Pacing:
    """The controller's settings: target duration and size bounds."""

    target_seconds: float = TARGET_SECONDS
    idle_target_seconds: float = IDLE_TARGET_SECONDS
    min_size: int = MIN_SIZE
    max_size: int = 10_000
    max_growth: float = MAX_GROWTH
    idle_growth: float = IDLE_GROWTH
    decay: float = DECAY

    def target(self, contended: bool) -> float:
        """The target duration: the short one under contention, else the idle one (if longer)."""
        if contended:
            return self.target_seconds
        return max(self.target_seconds, self.idle_target_seconds)

    def clamp(self, size: float) -> int:
        """``size`` rounded and kept within ``[min_size, max_size]``."""
        return max(self.min_size, min(self.max_size, int(size)))


@dataclass(frozen=True)
class History:
    """Exponentially weighted sums of measurements ``(parents, seconds)``, and the last good fit."""

    weight: float = 0.0
    n: float = 0.0
    t: float = 0.0
    nn: float = 0.0
    nt: float = 0.0
    fixed: float = -1.0  # last fitted fixed cost; negative: none yet

    def add(self, parents: int, seconds: float, decay: float) -> History:
        """This history with one more measurement; older ones fade by ``decay``."""
        grown = History(
            self.weight * decay + 1,
            self.n * decay + parents,
            self.t * decay + seconds,
            self.nn * decay + parents * parents,
            self.nt * decay + parents * seconds,
            self.fixed,
        )
        fitted = grown._regression()
        return replace(grown, fixed=fitted[0]) if fitted else grown

    def _regression(self) -> tuple[float, float] | None:
        """The least-squares line, when the sizes spread enough to tell fixed from per-parent."""
        mean_n, mean_t = self.n / self.weight, self.t / self.weight
        var = self.nn / self.weight - mean_n * mean_n
        if var <= (0.05 * mean_n) ** 2:
            return None
        slope = (self.nt / self.weight - mean_n * mean_t) / var
        if slope <= 0:  # noise swamped the sizes' effect: no usable line
            return None
        return max(0.0, mean_t - slope * mean_n), slope

    def fit(self) -> tuple[float, float] | None:
        """``(fixed seconds, seconds per parent)`` for the history, or None when empty.

        A least-squares line when the sizes spread enough; otherwise the last
        fitted fixed cost (a steady size gives no new evidence about it) with
        the per-parent cost the recent measurements leave; with no fit ever,
        all of the time counts as per-parent (a plain rows-per-second estimate).
        """
        if self.weight <= 0 or self.n <= 0:
            return None
        regression = self._regression()
        if regression is not None:
            return regression
        mean_n, mean_t = self.n / self.weight, self.t / self.weight
        fixed = self.fixed if 0 <= self.fixed < mean_t else 0.0
        return fixed, (mean_t - fixed) / mean_n

    def dumps(self) -> str:
        """JSON text, for the run row."""
        return json.dumps([self.weight, self.n, self.t, self.nn, self.nt, self.fixed])

    @classmethod
    def loads(cls, text: str | None) -> History:
        """The history stored by :meth:`dumps` (empty for None or unreadable text)."""
        try:
            return cls(*[float(x) for x in json.loads(text or "[]")][:6])
        except (TypeError, ValueError):
            return cls()


@dataclass(frozen=True)
class Step:
    """The controller's state after one measurement: the next size and the updated history."""

    size: int
    history: History = field(default_factory=History)

    @property
    def seconds_per_parent(self) -> float | None:
        """The fitted marginal cost of one parent (None before any measurement)."""
        fitted = self.history.fit()
        return fitted[1] if fitted else None


def ideal_size(pacing: Pacing, fixed: float, per_parent: float, *, contended: bool = True) -> float:
    """The size whose fitted duration is the target; if the fixed cost alone comes close,
    the size whose fixed cost is half of its duration (smaller would only add transactions)."""
    if per_parent <= 0:
        return float(pacing.max_size)
    target = pacing.target(contended)
    if fixed <= target / 2:
        return (target - fixed) / per_parent
    return fixed / per_parent


def next_size(
    pacing: Pacing,
    current: int,
    parents: int,
    seconds: float,
    history: History | None = None,
    *,
    back_off: bool = False,
    contended: bool = True,
) -> Step:
    """The size of the next batch after one of ``parents`` took ``seconds``.

    :param current: the size the batch was cut with (a last batch of a range
        may hold fewer ``parents``).
    :param history: the measurements so far (None: none yet).
    :param back_off: the database signalled contention (sessions waiting on
        the batch's locks, a lock the batch could not get): shrink by
        :data:`BACKOFF_SHRINK` whatever the estimate says.
    :param contended: application sessions waited on the run's locks lately:
        aim at ``target_seconds``, growing by at most ``max_growth`` a step;
        otherwise at the (longer) ``idle_target_seconds``, growing by at most
        ``idle_growth``.
    """
    history = history or History()
    if parents > 0 and seconds >= 0:
        history = history.add(parents, seconds, pacing.decay)
    if back_off:
        return Step(pacing.clamp(current * BACKOFF_SHRINK), history)
    growth = pacing.max_growth if contended else max(pacing.max_growth, pacing.idle_growth)
    fitted = history.fit()
    if fitted is None:
        return Step(pacing.clamp(current * growth), history)
    ideal = ideal_size(pacing, *fitted, contended=contended)
    # Growth is capped, shrinking is not.
    return Step(pacing.clamp(min(ideal, current * growth)), history)


def replay(pacing: Pacing, start: int, measurements: Iterable[tuple[int, float]]) -> list[int]:
    """The sizes the controller picks over recorded ``(parents, seconds)`` measurements.

    Element 0 is ``start``; element ``i`` is the size chosen after measurement ``i``.
    """
    sizes, size, history = [start], start, History()
    for parents, seconds in measurements:
        step = next_size(pacing, size, parents, seconds, history)
        size, history = step.size, step.history
        sizes.append(size)
    return sizes
