"""Adaptive batch size: a pure controller choosing the next transaction's size from measured ones.

Like GitLab's batch optimizer: the time per parent is estimated from a
weighted history (recent transactions weigh more), the next size aims at the
target transaction duration, growth is capped per step (one fast outlier must
not make the next transaction huge) while shrinking is not (one slow
transaction is a reason to back off at once), and the result stays within
bounds. No clock, no database: callers pass what they measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Default target duration of one batch transaction (seconds): short enough
#: that an application write waiting on a batch's row locks is not noticed.
TARGET_SECONDS = 0.1

#: Default bounds of an adaptive batch (parents) and the first size tried.
MIN_SIZE = 100
START_SIZE = 1_000

#: Largest factor a batch may grow by from one transaction to the next.
MAX_GROWTH = 1.2

#: Weight of the newest measurement in the per-parent time estimate.
SMOOTHING = 0.3

#: Factor a batch shrinks by when the database asks us to back off.
BACKOFF_SHRINK = 0.5


@dataclass(frozen=True)
class Pacing:
    """The controller's settings: target duration and size bounds."""

    target_seconds: float = TARGET_SECONDS
    min_size: int = MIN_SIZE
    max_size: int = 10_000
    max_growth: float = MAX_GROWTH
    smoothing: float = SMOOTHING

    def clamp(self, size: float) -> int:
        """``size`` rounded and kept within ``[min_size, max_size]``."""
        return max(self.min_size, min(self.max_size, int(size)))


@dataclass(frozen=True)
class Step:
    """The controller's state after one measurement: next size and per-parent estimate."""

    size: int
    seconds_per_parent: float | None


def estimate(
    previous: float | None, parents: int, seconds: float, smoothing: float
) -> float | None:
    """Fold one measurement (``parents`` recounted in ``seconds``) into the per-parent estimate."""
    if parents <= 0 or seconds < 0:
        return previous
    measured = seconds / parents
    if previous is None:
        return measured
    return smoothing * measured + (1 - smoothing) * previous


def next_size(
    pacing: Pacing,
    current: int,
    parents: int,
    seconds: float,
    seconds_per_parent: float | None = None,
    *,
    back_off: bool = False,
) -> Step:
    """The size of the next batch after one of ``parents`` took ``seconds``.

    :param current: the size the batch was cut with (a last batch of a range
        may hold fewer ``parents``).
    :param seconds_per_parent: the estimate before this measurement (None: none yet).
    :param back_off: the database signalled contention (sessions waiting on
        the batch's locks, a lock the batch could not get): shrink by
        :data:`BACKOFF_SHRINK` whatever the estimate says.
    """
    per_parent = estimate(seconds_per_parent, parents, seconds, pacing.smoothing)
    if back_off:
        return Step(pacing.clamp(current * BACKOFF_SHRINK), per_parent)
    if not per_parent:
        return Step(pacing.clamp(current * pacing.max_growth), per_parent)
    ideal = pacing.target_seconds / per_parent
    # Growth is capped, shrinking is not.
    return Step(pacing.clamp(min(ideal, current * pacing.max_growth)), per_parent)


def replay(pacing: Pacing, start: int, measurements: Iterable[tuple[int, float]]) -> list[int]:
    """The sizes the controller picks over recorded ``(parents, seconds)`` measurements.

    Element 0 is ``start``; element ``i`` is the size chosen after measurement ``i``.
    """
    sizes, size, per_parent = [start], start, None
    for parents, seconds in measurements:
        step = next_size(pacing, size, parents, seconds, per_parent)
        size, per_parent = step.size, step.seconds_per_parent
        sizes.append(size)
    return sizes
