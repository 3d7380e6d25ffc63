"""The adaptive batch-size controller as a pure function over recorded durations (no clock)."""

from __future__ import annotations

from alembic_counterfill.pacing import History, Pacing, next_size, replay

PACING = Pacing(target_seconds=0.1, min_size=100, max_size=10_000)


def _trace(start: int, fixed: float, per_parent: float, noise: list[float]) -> list[int]:
    """Sizes chosen against a table costing ``fixed + per_parent * n`` seconds (times noise)."""
    size, history, sizes = start, History(), [start]
    for factor in noise:
        seconds = (fixed + size * per_parent) * factor
        step = next_size(PACING, size, size, seconds, history)
        size, history = step.size, step.history
        sizes.append(size)
    return sizes


NOISE = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.0, 0.95, 1.05, 1.0] * 4


def test_fast_batches_grow_by_at_most_the_growth_cap_each_step() -> None:
    sizes = replay(PACING, 1_000, [(1_000, 0.001)] * 5)
    assert sizes == [1_000, 1_200, 1_440, 1_728, 2_073, 2_487]


def test_growth_stops_at_the_upper_bound() -> None:
    assert replay(PACING, 9_000, [(9_000, 0.001)] * 3) == [9_000, 10_000, 10_000, 10_000]


def test_a_slow_batch_shrinks_at_once_to_the_target() -> None:
    # 1,000 parents took 1 s: 1 ms per parent, so 100 ms is 100 parents, in one step.
    step = next_size(PACING, 1_000, 1_000, 1.0)
    assert step.size == 100
    assert step.seconds_per_parent == 0.001


def test_shrinking_stops_at_the_lower_bound() -> None:
    assert next_size(PACING, 1_000, 1_000, 100.0).size == 100


def test_sizes_settle_near_the_target_with_noisy_durations() -> None:
    # 50 us per parent, no fixed cost: 100 ms is 2,000 parents.
    sizes = _trace(1_000, 0.0, 50e-6, NOISE)
    assert all(1_200 <= s <= 2_600 for s in sizes[-20:])


def test_a_fixed_cost_per_transaction_is_told_from_the_per_parent_cost() -> None:
    # 20 ms per transaction plus 20 us per parent: 100 ms is 4,000 parents.
    assert all(3_500 <= s <= 4_500 for s in _trace(1_000, 0.020, 20e-6, [1.0] * 40)[-10:])
    assert all(2_400 <= s <= 4_500 for s in _trace(1_000, 0.020, 20e-6, NOISE)[-20:])


def test_when_the_fixed_cost_alone_nears_the_target_the_size_does_not_collapse() -> None:
    # 90 ms per transaction (a loaded server) and 25 us per parent: only 400
    # parents fit in 100 ms, and shrinking to them would mostly add
    # transactions. Without noise the controller settles where the fixed cost
    # is half of each transaction (3,600 parents); with noise it stays well
    # above the 400 a rows-per-second estimate would pick.
    assert _trace(1_000, 0.090, 25e-6, [1.0] * 40)[-10:] == [3_599] * 10
    assert min(_trace(1_000, 0.090, 25e-6, NOISE)[-20:]) >= 600


def test_history_weighs_recent_measurements_more() -> None:
    # Slow early transactions, fast recent ones of the same size: the fit follows the recent.
    history = History()
    for _ in range(5):
        history = history.add(1_000, 1.0, PACING.decay)
    for _ in range(15):
        history = history.add(1_000, 0.01, PACING.decay)
    fitted = history.fit()
    assert fitted is not None and fitted[1] < 1e-4


def test_history_round_trips_through_its_text_form() -> None:
    history = History().add(1_000, 0.05, 0.8).add(1_200, 0.06, 0.8)
    assert History.loads(history.dumps()) == history
    assert History.loads(None) == History() == History.loads("garbage")


def test_back_off_halves_the_size_whatever_the_estimate() -> None:
    step = next_size(PACING, 4_000, 4_000, 0.001, back_off=True)
    assert step.size == 2_000
    assert next_size(PACING, 150, 150, 0.001, back_off=True).size == 100


def test_no_measurement_grows_by_the_cap() -> None:
    assert next_size(PACING, 1_000, 0, 0.0).size == 1_200


def _contention_trace(
    pacing: Pacing, start: int, fixed: float, per_parent: float, contended: list[bool]
) -> list[int]:
    """Sizes chosen against ``fixed + per_parent * n`` seconds, contended or not at each step."""
    size, history, sizes = start, History(), [start]
    for flag in contended:
        step = next_size(pacing, size, size, fixed + size * per_parent, history, contended=flag)
        size, history = step.size, step.history
        sizes.append(size)
    return sizes


TWO_TARGETS = Pacing(target_seconds=0.03, idle_target_seconds=0.25, max_size=20_000)


def test_without_contention_sizes_aim_at_the_idle_target() -> None:
    # 10 ms per transaction plus 20 us per parent: 0.25 s is 12,000 parents
    # (0.03 s would be 1,000); growth is capped at 2x a step (not 1.2x).
    sizes = _contention_trace(TWO_TARGETS, 1_000, 0.010, 20e-6, [False] * 40)
    assert all(b <= a * 2 for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[:4] == [1_000, 2_000, 4_000, 8_000]  # then the ideal, about 12,000
    assert all(11_000 <= s <= 13_000 for s in sizes[-5:])


def test_contention_shrinks_at_once_to_the_short_target() -> None:
    sizes = _contention_trace(TWO_TARGETS, 1_000, 0.010, 20e-6, [False] * 40 + [True] * 3)
    assert sizes[-4] > 10_000
    # The first contended step lands on the short target's size (1,000) at once.
    assert all(900 <= s <= 1_100 for s in sizes[-3:])


def test_the_idle_target_is_never_shorter_than_the_target() -> None:
    short = Pacing(target_seconds=0.5, idle_target_seconds=0.25)
    assert short.target(contended=False) == short.target(contended=True) == 0.5
    assert Pacing().target(contended=False) > Pacing().target(contended=True)
