"""The request rate's token bucket, on a clock the test moves: bursts, refills, callers apart."""

from __future__ import annotations

import pytest

from dia_ort.serving.limits import RequestRate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_gets_its_minute_at_once_then_one_request_each_sixtieth_of_a_minute():
    clock = Clock()
    rate = RequestRate(6, clock)
    assert [rate.take("a") for _ in range(6)] == [(5, 0.0), (4, 0.0), (3, 0.0), (2, 0.0), (1, 0.0), (0, 0.0)]
    assert rate.take("a") == (0, pytest.approx(10.0))  # one token comes back every 60 / 6 s
    clock.now += 4
    assert rate.take("a") == (0, pytest.approx(6.0))  # a refused request is not counted
    clock.now += 6
    assert rate.take("a") == (0, 0.0)
    assert rate.take("a")[1] == pytest.approx(10.0)
    clock.now += 3600
    assert rate.take("a") == (5, 0.0)  # refilled to the minute's share, no more


def test_callers_are_counted_apart():
    rate = RequestRate(1, Clock())
    assert rate.take("a") == (0, 0.0)
    assert rate.take("a")[1] == pytest.approx(60.0)
    assert rate.take("b") == (0, 0.0)


def test_callers_whose_bucket_refilled_are_forgotten(monkeypatch):
    """The table stays about the size of the last minute's callers, whatever addresses come."""
    monkeypatch.setattr(RequestRate, "MAX_CALLERS", 10)
    clock = Clock()
    rate = RequestRate(2, clock)
    for caller in range(10):
        rate.take(str(caller))
    clock.now += 60  # every bucket full again
    rate.take("late")  # the eleventh caller: the full ones go
    assert list(rate.buckets) == ["late"]
    rate.take("late")
    assert rate.take("late")[1] > 0  # and the one that stays is still counted


@pytest.mark.parametrize("per_minute", [0, -3])
def test_a_rate_under_one_is_refused(per_minute):
    with pytest.raises(ValueError, match="at least 1 a minute"):
        RequestRate(per_minute)
