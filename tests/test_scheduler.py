"""Continuous batching: a request's tokens and audio do not depend on who else is in the batch."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort import batching, engine
from dia_ort.batching import HostRows, unconditional_length
from dia_ort.item import PREFILL_CHUNK, cfg_text_rows, prefill_chunks
from dia_ort.scheduler import QueueFull, Scheduler
from dia_ort.text import encode_text
from export.architecture import TINY

TEXTS = [
    "[S1] Hello there. [S2] Hi!",
    "[S1] A much longer line of text, so that the batch needs padding. (laughs) [S2] Right.",
    "[S2] Short.",
]
NEW = 30


def solo_codes(dia, text, prompt=None, **options):
    """The codes `generate_codes` gives the text alone (checked against transformers elsewhere)."""
    (codes,) = dia.generate_codes([text], None if prompt is None else [prompt], **options)
    return codes


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
    want = solo_codes(dia, TEXTS[0], temperature=0, max_new_tokens=NEW)
    np.testing.assert_array_equal(request.codes(), want)
    assert request.done and scheduler.decoding.rows.rows == 0


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
        want = solo_codes(dia, text, prompt, temperature=0, max_new_tokens=new)
        np.testing.assert_array_equal(request.codes(), want)


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
    assert all(r.done for r in requests) and scheduler.decoding.rows.rows == 0


def test_a_cancelled_request_frees_its_rows_at_the_next_step(tiny_dia):
    scheduler = Scheduler(tiny_dia, max_batch=3)
    stays = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)
    leaves = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    also = scheduler.submit(TEXTS[2], temperature=0, max_new_tokens=NEW)
    run(scheduler, steps=5)
    assert scheduler.decoding.rows.rows == 6
    leaves.cancel()
    scheduler.step()
    assert scheduler.decoding.rows.rows == 4 and leaves.first_row is None and not leaves.done
    run(scheduler)
    for request, text in ((stays, TEXTS[1]), (also, TEXTS[2])):  # the pair moved into the freed rows
        np.testing.assert_array_equal(
            request.codes(), solo_codes(tiny_dia, text, temperature=0, max_new_tokens=NEW)
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
        HostRows(tiny_dia.engine, 3)


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
    monkeypatch.setattr(engine, "CACHE_GROWTH", 8)
    scheduler = Scheduler(tiny_dia, max_batch=2)
    first = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    run(scheduler, steps=11)
    second = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)  # a longer text widens the keys
    run(scheduler)
    for request, text in ((first, TEXTS[0]), (second, TEXTS[1])):
        np.testing.assert_array_equal(
            request.codes(), solo_codes(tiny_dia, text, temperature=0, max_new_tokens=NEW)
        )
    assert TINY.decoder.max_length >= scheduler.decoding.rows.capacity


def test_a_failing_step_fails_the_requests_in_flight_and_the_next_ones_run(tiny_dia, monkeypatch):
    scheduler = Scheduler(tiny_dia, max_batch=2).start()
    try:
        original = HostRows.step
        calls = {"n": 0}

        def flaky(self, tokens, held=None):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("the device went away")
            return original(self, tokens, held)

        monkeypatch.setattr(HostRows, "step", flaky)
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
            request.codes(), solo_codes(tiny_dia, text, temperature=0, max_new_tokens=new)
        )


def test_a_request_that_fails_to_join_gets_its_error_and_the_others_run(tiny_dia, monkeypatch):
    """Both join at one step, so their prefill is one call; it fails whenever it holds the first one's
    rows: that request alone fails."""
    scheduler = Scheduler(tiny_dia, max_batch=3)
    original = HostRows.prefill

    def failing_with_the_first(self, first, tokens):
        if failed.first_row is not None and first <= failed.first_row < first + len(tokens):
            raise MemoryError("no room for the prefill")
        return original(self, first, tokens)

    monkeypatch.setattr(HostRows, "prefill", failing_with_the_first)
    failed = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    fine = scheduler.submit(TEXTS[1], temperature=0, max_new_tokens=NEW)
    run(scheduler)
    with pytest.raises(MemoryError, match="no room"):
        list(failed)
    np.testing.assert_array_equal(
        fine.codes(), solo_codes(tiny_dia, TEXTS[1], temperature=0, max_new_tokens=NEW)
    )
    assert scheduler.decoding.rows.rows == 0


def test_requests_joining_at_one_step_share_one_encoder_run_and_a_prefill_per_length(tiny_dia, monkeypatch):
    """Three texts without a prompt and one with: one encoder run, two prefills (1 known row and 7),
    and every request gets the tokens it gets alone."""
    calls = {"add": [], "prefill": []}
    for name in calls:
        original = getattr(HostRows, name)

        def spy(self, first, tokens, name=name, original=original):
            calls[name].append(len(first) if name == "add" else len(tokens))
            return original(self, first, tokens)

        monkeypatch.setattr(HostRows, name, spy)
    prompt = np.random.default_rng(5).integers(0, 1024, size=(6, TINY.decoder.num_channels))
    prompts = [None, prompt, None, None]
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0] + " Again."]
    scheduler = Scheduler(tiny_dia, max_batch=4)
    requests = [
        scheduler.submit(text, prompt, seed=index, max_new_tokens=NEW)
        for index, (text, prompt) in enumerate(zip(texts, prompts, strict=True))
    ]
    run(scheduler)
    assert calls == {"add": [8], "prefill": [6, 2]}  # rows: three pairs of 1 known row, one pair of 7
    for index, (request, text, prompt) in enumerate(zip(requests, texts, prompts, strict=True)):
        want = solo_codes(tiny_dia, text, prompt, seed=index, max_new_tokens=NEW)
        np.testing.assert_array_equal(request.codes(), want)


def test_a_long_prompt_prefills_in_chunks_between_the_others_steps(tiny_dia, monkeypatch):
    """A prompt of 150 frames joins a running request: its prefill takes one chunk per step while the
    other request goes on decoding a row per step, and both get the tokens they get alone."""
    chunk_rows = []
    original = HostRows.prefill

    def spy(self, first, tokens):
        chunk_rows.append(tokens.shape[1])
        return original(self, first, tokens)

    monkeypatch.setattr(HostRows, "prefill", spy)
    prompt = np.random.default_rng(6).integers(0, 1024, size=(150, TINY.decoder.num_channels))
    scheduler = Scheduler(tiny_dia, max_batch=2)
    running = scheduler.submit(TEXTS[0], temperature=0, max_new_tokens=NEW)
    run(scheduler, steps=2)
    joining = scheduler.submit(TEXTS[1], prompt, seed=1, max_new_tokens=20)
    row, steps = running.row, 0
    while joining.tokens is None:
        scheduler.step()
        steps += 1
    chunks = prefill_chunks(joining.item.prefill)
    assert len(chunks) == steps > 2
    assert chunk_rows[1:] == [end - start for start, end in chunks]
    assert max(chunk_rows) == PREFILL_CHUNK
    assert running.row == row + steps  # a row each step, the chunks between them
    run(scheduler)
    np.testing.assert_array_equal(
        running.codes(), solo_codes(tiny_dia, TEXTS[0], temperature=0, max_new_tokens=NEW)
    )
    want = solo_codes(tiny_dia, TEXTS[1], prompt, seed=1, max_new_tokens=20)
    np.testing.assert_array_equal(joining.codes(), want)


def test_an_unconditional_row_is_encoded_once_per_length(tiny_dia, monkeypatch):
    """A pair's unconditional row (all ids 0 under its text's mask) comes from the engine's kept rows
    once a text of its length was encoded: the encoder runs the text rows and one unconditional row
    for each new length, and the buffers hold the bits a plain encoder run of every row gives."""
    tiny_engine, encode_rows = tiny_dia.engine, batching.encode_rows
    tiny_engine.unconditional_rows.clear()
    runs = []

    def counted(engine_, text_ids, text_mask, cross):
        runs.append(len(text_ids))
        return encode_rows(engine_, text_ids, text_mask, cross)

    monkeypatch.setattr(batching, "encode_rows", counted)
    length = tiny_dia.config.text_length
    first, same_length, longer, long = (
        encode_text(t, length)
        for t in ("[S1] one", "[S1] two", "[S1] three four five six", "[S2] seven " * 9)
    )
    assert len(first) == len(same_length) < len(longer) < 32 < len(long) <= length  # past vector widths
    for texts, encoded in (
        ([first], 2),  # a new length: both rows
        ([same_length], 1),  # another text of that length: its text row alone
        ([longer, first, longer], 4),  # three text rows and one unconditional row for the new length
        ([long, same_length, longer], 4),  # three text rows and one new length
        ([longer, long], 2),  # every length kept
    ):
        ids, mask = cfg_text_rows(texts)
        rows = HostRows(tiny_engine, len(ids))
        rows.add(ids, mask)
        assert runs[-1] == encoded
        for buffer, value in zip(rows.cross, encode_rows(tiny_engine, ids, mask, None), strict=True):
            for row, n in enumerate(mask.sum(axis=1)):
                np.testing.assert_array_equal(buffer[row, :, :n], value.numpy()[row, :, :n])
    assert len(runs) == 5
    assert not tiny_engine.unconditional_rows.get(len(first))[0].flags.writeable  # shared by batches


def test_unconditional_length_recognises_only_unconditional_rows():
    mask = np.array([True, True, True, False])
    assert unconditional_length(np.zeros(4, dtype=np.int64), mask) == 3
    assert unconditional_length(np.array([0, 5, 0, 0]), mask) is None  # a text
    assert unconditional_length(np.zeros(4, dtype=np.int64), np.array([True, False, True, False])) is None
