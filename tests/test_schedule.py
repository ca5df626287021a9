"""The refresh schedule: a quick first round, then every tenant on its own phase, spread over the interval."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta

import pytest

from exlogare_exporter.poller import SpreadTrigger

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
INTERVAL = 60.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def offset(moment: datetime | None) -> float:
    assert moment is not None
    return (moment - T0).total_seconds()


def test_runs_stay_on_the_phase_grid() -> None:
    trigger = SpreadTrigger(seconds=INTERVAL, start_date=at(30), timezone=UTC)
    assert offset(trigger.get_next_fire_time(None, at(0))) == 30  # not started: the phase itself
    assert offset(trigger.get_next_fire_time(None, at(100))) == 150  # the next slot after now
    assert offset(trigger.get_next_fire_time(at(30), at(30))) == 90
    assert offset(trigger.get_next_fire_time(at(95.5), at(96))) == 150  # a jittered run: back on the grid
    # a first run before the phase (the quick first round): the next slot at least an interval later
    assert offset(trigger.get_next_fire_time(at(0.5), at(1))) == 90
    assert offset(trigger.get_next_fire_time(at(29.999), at(30))) == 90


def test_jitter_delays_within_its_bound_and_never_accumulates() -> None:
    trigger = SpreadTrigger(seconds=INTERVAL, start_date=at(0), jitter=6, timezone=UTC)
    previous = at(0)
    for round_ in range(1, 200):
        previous = trigger.get_next_fire_time(previous, previous)  # type: ignore[assignment]
        assert round_ * INTERVAL <= offset(previous) <= round_ * INTERVAL + 6


@pytest.mark.parametrize("tenants", [10, 100, 1000])
def test_phases_spread_evenly_over_the_interval(tenants: int) -> None:
    """As the poller assigns them: tenant i at phase i / n of the interval; after twenty rounds every tenth
    of the interval still starts a tenth of the refreshes (jitter only adds its bounded delay, above)."""
    runs = []
    for index in range(tenants):
        trigger = SpreadTrigger(seconds=INTERVAL, start_date=at(INTERVAL * index / tenants), timezone=UTC)
        previous = at(index * 0.01)  # the first round
        for _ in range(20):
            previous = trigger.get_next_fire_time(previous, previous)  # type: ignore[assignment]
        runs.append(offset(previous))
    assert all(20 * INTERVAL <= r < 21 * INTERVAL for r in runs)
    bins = collections.Counter(int((r % INTERVAL + 1e-9) // (INTERVAL / 10)) for r in runs)
    assert sorted(bins) == list(range(10)) and set(bins.values()) == {tenants // 10}
