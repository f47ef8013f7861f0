"""kaggle_utils.scoring.budget with a fake clock: deadlines and projected times."""

from __future__ import annotations

import math

import pytest

from kaggle_utils.scoring.budget import Deadline, RateMeter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_from_now() -> None:
    clock = FakeClock()
    d = Deadline(60, clock=clock)
    assert d.start == 1000.0
    assert d.elapsed() == 0 and d.remaining() == 60
    clock.now += 45
    assert d.elapsed() == 45 and d.remaining() == 15
    assert d.allows(15) and not d.allows(15.01)
    clock.now += 20
    assert d.remaining() == -5
    assert not d.allows(0)


def test_deadline_counts_from_given_start() -> None:
    clock = FakeClock(5000.0)
    d = Deadline(3600, start=2000.0, clock=clock)
    assert d.elapsed() == 3000 and d.remaining() == 600
    assert d.allows(600) and not d.allows(601)


def test_deadline_long_past() -> None:
    clock = FakeClock(10_000.0)
    d = Deadline(30, start=0.0, clock=clock)
    assert d.remaining() < 0 and not d.allows(0.0)


@pytest.mark.parametrize("seconds", [None, 0, 0.0])
def test_no_limit(seconds) -> None:
    clock = FakeClock()
    d = Deadline(seconds, clock=clock)
    clock.now += 1e9
    assert d.remaining() == math.inf
    assert d.allows(1e12)
    assert d.elapsed() == 1e9


def test_rate_meter_estimate() -> None:
    r = RateMeter(safety=1.25)
    assert r.estimate(10_000) == 0.0  # nothing measured yet
    r.add(tokens=1000, seconds=2.0)
    r.add(tokens=3000, seconds=6.0)  # 2 ms per token overall
    assert r.estimate(2000) == pytest.approx(1.25 * 2000 * 0.002)
    # no batch is projected faster than the fastest one measured (per-batch overheads do not shrink)
    assert r.estimate(500) == pytest.approx(1.25 * 2.0)
    assert RateMeter(safety=1.0).estimate(1) == 0.0
    # a prior is used until the first measurement: a first batch is not free
    assert RateMeter(safety=1.0, prior_seconds_per_token=0.005).estimate(2000) == pytest.approx(10.0)


def test_rate_meter_with_deadline() -> None:
    """The pattern every scoring loop uses: start the next batch only if its projected time fits."""
    clock = FakeClock()
    d, r = Deadline(10, clock=clock), RateMeter(safety=1.0)
    done = 0
    while d.allows(r.estimate(100)):
        clock.now += 3  # each batch of 100 tokens takes 3 s
        r.add(100, 3.0)
        done += 1
    # after 3 batches 1 s is left, a 4th (3 s) would not fit
    assert done == 3 and d.remaining() == 1
