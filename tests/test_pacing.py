"""The adaptive batch-size controller as a pure function over recorded durations (no clock)."""

from __future__ import annotations

from alembic_counterfill.pacing import Pacing, estimate, next_size, replay

PACING = Pacing(target_seconds=0.1, min_size=100, max_size=10_000)


def test_fast_batches_grow_by_at_most_the_growth_cap_each_step() -> None:
    # 1 ms per 1,000 parents: the ideal size is far above, growth is capped at 20 % a step.
    sizes = replay(PACING, 1_000, [(1_000, 0.001)] * 5)
    assert sizes == [1_000, 1_200, 1_440, 1_728, 2_073, 2_487]


def test_growth_stops_at_the_upper_bound() -> None:
    sizes = replay(PACING, 9_000, [(9_000, 0.001)] * 3)
    assert sizes == [9_000, 10_000, 10_000, 10_000]


def test_a_slow_batch_shrinks_at_once_to_the_target() -> None:
    # 1,000 parents took 1 s: 1 ms per parent, so 100 ms is 100 parents, in one step.
    step = next_size(PACING, 1_000, 1_000, 1.0)
    assert step.size == 100
    assert step.seconds_per_parent == 0.001


def test_shrinking_stops_at_the_lower_bound() -> None:
    assert next_size(PACING, 1_000, 1_000, 100.0).size == 100


def test_sizes_settle_near_the_target_over_a_recorded_history() -> None:
    # Recorded durations of a table costing 50 us per parent, measured with noise.
    history = []
    size = 1_000
    per_parent = None
    for noise in [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.0, 0.95, 1.05, 1.0] * 3:
        seconds = size * 50e-6 * noise
        history.append((size, seconds))
        step = next_size(PACING, size, size, seconds, per_parent)
        size, per_parent = step.size, step.seconds_per_parent
    # 100 ms / 50 us = 2,000 parents; the smoothed estimate keeps it within 15 %.
    assert 1_700 <= size <= 2_300
    assert replay(PACING, 1_000, history)[-1] == size  # replay is the same fold


def test_history_is_weighted_towards_recent_measurements() -> None:
    # Slow early batches, fast recent ones: the estimate follows the recent ones.
    slow = estimate(None, 1_000, 1.0, PACING.smoothing)
    recent = slow
    for _ in range(10):
        recent = estimate(recent, 1_000, 0.01, PACING.smoothing)
    assert slow is not None and recent is not None
    assert recent < slow / 10


def test_back_off_halves_the_size_whatever_the_estimate() -> None:
    step = next_size(PACING, 4_000, 4_000, 0.001, back_off=True)
    assert step.size == 2_000
    assert next_size(PACING, 150, 150, 0.001, back_off=True).size == 100


def test_a_short_last_piece_is_measured_per_parent() -> None:
    # 10 parents in 1 ms (a range's tail): 100 us per parent, target 100 ms -> 1,000.
    step = next_size(PACING, 5_000, 10, 0.001)
    assert step.size == 1_000


def test_no_measurement_grows_by_the_cap() -> None:
    assert next_size(PACING, 1_000, 0, 0.0).size == 1_200
