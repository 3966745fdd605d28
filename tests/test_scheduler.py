"""Continuous batching: a request's tokens and audio do not depend on who else is in the batch."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort import GenerationOptions
from dia_ort.batching import BatchDecoder
from dia_ort.scheduler import QueueFull, Scheduler
from export.architecture import TINY

TEXTS = [
    "[S1] Hello there. [S2] Hi!",
    "[S1] A much longer line of text, so that the batch needs padding. (laughs) [S2] Right.",
    "[S2] Short.",
]
NEW = 30


def solo_rows(dia, text, prompt=None, **options):
    """The rows `Dia.start` produces for the text alone (checked against transformers elsewhere)."""
    generation = dia.start([text], None if prompt is None else [prompt], GenerationOptions(**options))
    for _ in generation:
        pass
    return generation.items[0]


def run(scheduler, steps=None):
    """Step the scheduler `steps` times (all the way when None)."""
    count = 0
    while scheduler.step() and (steps is None or count + 1 < steps):
        count += 1
    assert steps is None or count + 1 == steps


@pytest.fixture(params=["0626", "v0.1"])
def dia(request, tiny_dia, v01_dia):
    return tiny_dia if request.param == "0626" else v01_dia


def test_a_request_alone_gets_the_tokens_of_generate(dia):
    scheduler = Scheduler(dia, max_batch=4)
    request = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    run(scheduler)
    want = solo_rows(dia, TEXTS[0], temperature=0, max_new_tokens=NEW)
    np.testing.assert_array_equal(request.item.rows, want.rows)
    assert request.done and scheduler.batch.rows == 0


def test_requests_joining_mid_way_get_their_solo_tokens(dia):
    """Three requests, joining at steps 1, 8 and 20, with and without prompts, all greedy."""
    rng = np.random.default_rng(3)
    prompts = [None, rng.integers(0, 1024, size=(12, 9)), rng.integers(0, 1024, size=(5, 9))]
    scheduler = Scheduler(dia, max_batch=3)
    requests = [scheduler.submit(TEXTS[0], prompts[0], temperature=0, max_new_tokens=NEW)]
    run(scheduler, steps=7)
    requests.append(scheduler.submit(TEXTS[1], prompts[1], temperature=0, max_new_tokens=NEW + 5))
    run(scheduler, steps=12)
    assert scheduler.occupancy == 2
    requests.append(scheduler.submit(TEXTS[2], prompts[2], temperature=0, max_new_tokens=NEW - 10))
    run(scheduler)
    for request, text, prompt, new in zip(requests, TEXTS, prompts, (NEW, NEW + 5, NEW - 10), strict=True):
        want = solo_rows(dia, text, prompt, temperature=0, max_new_tokens=new)
        np.testing.assert_array_equal(request.item.rows, want.rows)
        np.testing.assert_array_equal(request.codes(), want.codes())


def test_streamed_audio_equals_generate_with_the_same_seed(tiny_dia):
    scheduler = Scheduler(tiny_dia, max_batch=2)
    first = scheduler.submit(TEXTS[0], seed=4, max_new_tokens=NEW)
    run(scheduler, steps=10)
    second = scheduler.submit(TEXTS[1], seed=5, max_new_tokens=NEW, sample_rate=24000)
    run(scheduler)
    np.testing.assert_array_equal(
        np.concatenate(list(first)), tiny_dia.generate(TEXTS[0], seed=4, max_new_tokens=NEW)
    )
    want = tiny_dia.generate(TEXTS[1], seed=5, max_new_tokens=NEW, sample_rate=24000)
    np.testing.assert_array_equal(np.concatenate(list(second)), want)


def test_the_batch_is_bounded_and_the_queue_too(tiny_dia):
    """A burst between two steps fills the free rows first, then the queue; beyond both, QueueFull."""
    scheduler = Scheduler(tiny_dia, max_batch=2, max_queue=3)
    requests = [scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW) for _ in range(5)]
    with pytest.raises(QueueFull, match="the batch is full and 3 requests are waiting"):
        scheduler.submit(TEXTS[0])
    scheduler.step()
    assert scheduler.occupancy == 2 and scheduler.queue_depth == 3  # two run, three wait
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        scheduler.submit(TEXTS[0])
    for _ in range(10 * NEW):  # until the first two end and two of the waiting take their rows
        if scheduler.queue_depth < 3:
            break
        scheduler.step()
    assert scheduler.occupancy == 2 and scheduler.queue_depth == 1
    requests.append(scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW))  # room again
    run(scheduler)
    assert all(r.done for r in requests) and scheduler.batch.rows == 0


def test_a_cancelled_request_frees_its_rows_at_the_next_step(tiny_dia):
    scheduler = Scheduler(tiny_dia, max_batch=3)
    stays = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)
    leaves = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    also = scheduler.submit(TEXTS[2], temperature=0, max_new_tokens=NEW)
    run(scheduler, steps=5)
    assert scheduler.batch.rows == 6
    leaves.cancel()
    scheduler.step()
    assert scheduler.batch.rows == 4 and leaves.first_row is None and not leaves.done
    run(scheduler)
    for request, text in ((stays, TEXTS[1]), (also, TEXTS[2])):  # the pair moved into the freed rows
        np.testing.assert_array_equal(
            request.item.rows, solo_rows(tiny_dia, text, temperature=0, max_new_tokens=NEW).rows
        )
    waiting = scheduler.submit(TEXTS[0])
    waiting.cancel()
    assert not scheduler.step() and list(waiting) == []  # dropped from the queue, its stream closed


def test_bad_requests_are_refused_before_they_queue(tiny_dia):
    scheduler = Scheduler(tiny_dia)
    with pytest.raises(ValueError, match="top_p"):
        scheduler.submit(TEXTS[0], top_p=3)
    with pytest.raises(ValueError, match="long_form"):
        scheduler.submit("[S1] " + "word " * 40)
    with pytest.raises(TypeError, match="unexpected keyword"):
        scheduler.submit(TEXTS[0], temprature=1)
    assert scheduler.queue_depth == 0
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(tiny_dia, max_batch=0)
    with pytest.raises(ValueError, match="multiple of 2"):
        BatchDecoder(tiny_dia.engine, 3)


def test_the_background_thread_serves_requests_from_other_threads(tiny_dia):
    scheduler = Scheduler(tiny_dia, max_batch=2).start()
    try:
        requests = [scheduler.submit(t, seed=i, max_new_tokens=NEW) for i, t in enumerate(TEXTS)]
        audio = [np.concatenate(list(r)) for r in requests]
    finally:
        scheduler.close()
    for i, (text, got) in enumerate(zip(TEXTS, audio, strict=True)):
        np.testing.assert_array_equal(got, tiny_dia.generate(text, seed=i, max_new_tokens=NEW))
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(TEXTS[0])


def test_cache_growth_keeps_every_rows_slots(tiny_dia, monkeypatch):
    monkeypatch.setattr(BatchDecoder, "GROWTH", 8)
    scheduler = Scheduler(tiny_dia, max_batch=2)
    first = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    run(scheduler, steps=11)
    second = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)  # a longer text widens the keys
    run(scheduler)
    for request, text in ((first, TEXTS[0]), (second, TEXTS[1])):
        np.testing.assert_array_equal(
            request.item.rows, solo_rows(tiny_dia, text, temperature=0, max_new_tokens=NEW).rows
        )
    assert TINY.decoder.max_length >= scheduler.batch.capacity


def test_a_failing_step_fails_the_requests_in_flight_and_the_next_ones_run(tiny_dia, monkeypatch):
    scheduler = Scheduler(tiny_dia, max_batch=2).start()
    try:
        original = BatchDecoder.step
        calls = {"n": 0}

        def flaky(self, tokens):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("the device went away")
            return original(self, tokens)

        monkeypatch.setattr(BatchDecoder, "step", flaky)
        failed = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
        with pytest.raises(RuntimeError, match="the device went away"):
            list(failed)
        after = scheduler.submit(TEXTS[1], seed=2, max_new_tokens=NEW)
        np.testing.assert_array_equal(
            np.concatenate(list(after)), tiny_dia.generate(TEXTS[1], seed=2, max_new_tokens=NEW)
        )
    finally:
        scheduler.close()


def test_a_short_text_joining_rows_a_longer_text_left_sees_none_of_it(tiny_dia):
    """The freed pair's text mask, cross keys and cache are cleared for the next request."""
    scheduler = Scheduler(tiny_dia, max_batch=2)
    stays = scheduler.submit(TEXTS[2], temperature=0, max_new_tokens=60)
    leaves = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=5)  # the longest text
    while not leaves.done:
        scheduler.step()
    joins = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    run(scheduler)
    for request, text, new in ((stays, TEXTS[2], 60), (joins, TEXTS[0], NEW)):
        np.testing.assert_array_equal(
            request.item.rows, solo_rows(tiny_dia, text, temperature=0, max_new_tokens=new).rows
        )


def test_a_request_that_fails_to_join_gets_its_error_and_the_others_run(tiny_dia, monkeypatch):
    scheduler = Scheduler(tiny_dia, max_batch=3)
    original = BatchDecoder.prefill

    def failing_once(self, first, tokens):
        monkeypatch.setattr(BatchDecoder, "prefill", original)
        raise MemoryError("no room for the prefill")

    monkeypatch.setattr(BatchDecoder, "prefill", failing_once)
    failed = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    fine = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)
    run(scheduler)
    with pytest.raises(MemoryError, match="no room"):
        list(failed)
    np.testing.assert_array_equal(
        fine.item.rows, solo_rows(tiny_dia, TEXTS[1], temperature=0, max_new_tokens=NEW).rows
    )
    assert scheduler.batch.rows == 0
