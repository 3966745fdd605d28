"""`Recent`: the last few results a model keeps (encoded clips, Dia2 prefix plans, unconditional text
rows), shared by threads."""

from __future__ import annotations

import threading

import pytest

from dia_ort.recent import Recent


def test_keeps_the_entries_used_last():
    recent: Recent[str, int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # a use: "b" is now the one used longest ago
    recent.put("c", 3)
    assert (recent.get("a"), recent.get("b"), recent.get("c")) == (1, None, 3)
    assert len(recent) == 2
    recent.put("a", 4)  # a new value for a kept key replaces it
    assert recent.get("a") == 4 and len(recent) == 2
    recent.clear()
    assert len(recent) == 0 and recent.get("a") is None


def test_a_weighed_one_keeps_its_budget():
    recent: Recent[str, str] = Recent(8, weigh=len, budget=10)
    recent.put("a", "x" * 4)
    recent.put("b", "x" * 4)
    assert recent.get("a") is not None  # a use: "b" is now the one used longest ago
    recent.put("c", "x" * 4)  # 12 > 10: the oldest goes
    assert (recent.get("a"), recent.get("b"), recent.get("c")) == ("xxxx", None, "xxxx")
    recent.put("c", "x" * 6)  # a new value replaces the old one's weight: 4 + 6 fits
    assert len(recent) == 2 and recent.get("a") == "xxxx"
    recent.put("d", "x" * 11)  # heavier than the budget alone: not kept, nothing dropped for it
    assert recent.get("d") is None and len(recent) == 2
    recent.put("a", "x" * 11)  # nor is a kept key's too heavy new value; its old one is gone too
    assert recent.get("a") is None and recent.get("c") == "x" * 6
    recent.clear()
    recent.put("e", "x" * 10)
    assert recent.get("e") == "x" * 10


def test_a_weighed_one_needs_a_budget():
    with pytest.raises(ValueError, match="budget"):
        Recent(4, weigh=len)


@pytest.mark.parametrize("size", [0, -1])
def test_a_size_below_one_is_refused(size):
    with pytest.raises(ValueError, match="at least 1"):
        Recent(size)


def test_threads_share_it_without_losing_the_bound():
    recent: Recent[int, int] = Recent(8)
    errors = []

    def work(offset: int) -> None:
        try:
            for i in range(500):
                key = (offset + i) % 20
                recent.put(key, key * 10)
                value = recent.get(key)
                assert value is None or value == key * 10
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(recent) == 8
