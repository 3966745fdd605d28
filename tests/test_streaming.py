"""Streaming: the chunks of every item, joined, are the plain result bit for bit, and come early."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort.codec import DEFAULT_GRID
from dia_ort.generation import Step
from dia_ort.options import GenerationOptions
from dia_ort.streaming import AudioChunk
from export.architecture import TINY

TEXT = "[S1] Hello there. [S2] Hi! How are you?"
D = max(TINY.delay_pattern)
DELAY = 4757  # samples the DAC decoder's audio lags its codes


def first_block_end(first_chunk_frames: int) -> int:
    """The end of the first decode block whose audio holds a first chunk (its frames less the delay)."""
    blocks = DEFAULT_GRID.blocks()
    return next(end for _, end in blocks if end * 512 - DELAY >= first_chunk_frames * 512)


def joined(chunks) -> np.ndarray:
    return np.concatenate([np.zeros(0, dtype=np.float32), *chunks])


@pytest.mark.parametrize(("first", "chunk"), [(8, 8), (1, 1), (16, 64), (32, 20), (500, 500)])
def test_stream_equals_generate_bit_for_bit(tiny_dia, first, chunk):
    kwargs = dict(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=70)
    want = tiny_dia.generate(TEXT, **kwargs)
    chunks = list(tiny_dia.generate_stream(TEXT, first_chunk_frames=first, chunk_frames=chunk, **kwargs))
    np.testing.assert_array_equal(joined(chunks), want)
    assert all(c.dtype == np.float32 and len(c) for c in chunks)
    if first_block_end(first) < 70 - D:  # that block is final before the item ends
        assert len(chunks) > 1 and len(chunks[0]) >= first * 512


def test_stream_with_an_audio_prompt_equals_generate(tiny_dia):
    prompt = np.random.default_rng(2).integers(0, 1024, size=(20, 9))
    kwargs = dict(temperature=0, max_new_tokens=50)
    want = tiny_dia.generate(TEXT, prompt, **kwargs)
    np.testing.assert_array_equal(joined(tiny_dia.generate_stream(TEXT, prompt, **kwargs)), want)


@pytest.mark.parametrize("rate", [24000, 16000, 48000])
def test_resampled_stream_equals_generate(tiny_dia, rate):
    kwargs = dict(seed=1, max_new_tokens=60, sample_rate=rate)
    want = tiny_dia.generate(TEXT, **kwargs)
    got = joined(tiny_dia.generate_stream(TEXT, first_chunk_frames=8, chunk_frames=16, **kwargs))
    assert len(got) == len(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_batch_stream_per_item_with_items_ending_at_different_steps(tiny_dia, ends_at_once):
    """Items that end at different steps each stream alone: a prompt of two prefill chunks ends a step
    after one of one chunk, and an item that ends at once ends first."""
    rng = np.random.default_rng(4)
    texts = [TEXT, "[S2] Short.", "[S1] A third one, with a longer line of text."]
    prompts = [rng.integers(0, 1024, size=(12, 9)), None, rng.integers(0, 1024, size=(70, 9))]
    kwargs = dict(temperature=1.0, seed=9, max_new_tokens=40)
    want = tiny_dia.generate_batch(texts, prompts, **kwargs)
    got: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for item, chunk in tiny_dia.generate_batch_stream(texts, prompts, **kwargs):
        got[item].append(chunk)
    for i in range(3):
        np.testing.assert_array_equal(joined(got[i]), want[i])

    generation = tiny_dia.start(texts, prompts, GenerationOptions(**kwargs))
    ends_at_once.add(generation.items[1])
    ended_at, step = {}, None
    for event in generation.stream(tiny_dia.codec):
        if isinstance(event, Step):
            step = event.index
        elif event.last:
            ended_at[event.item] = step
    assert len(set(ended_at.values())) == 3, ended_at  # three items, three different last steps


@pytest.mark.parametrize(
    ("first", "prompt_frames", "block_end"),
    [(8, 0, 18), (16, 0, 36), (8, 25, 18), (32, 10, 72), (20, 0, 36), (1, 0, 18)],
)
def test_first_chunk_comes_within_the_step_bound(tiny_dia, first, prompt_frames, block_end):
    """The first chunk is out after max_delay + the end of the first decode block (18, 36, 72, ...)
    whose audio, its frames less the decoder's lookahead, holds first_chunk_frames."""
    assert first_block_end(first) == block_end
    prompt = np.random.default_rng(0).integers(0, 1024, size=(prompt_frames, 9)) if prompt_frames else None
    options = GenerationOptions(temperature=0, max_new_tokens=120)
    generation = tiny_dia.start([TEXT], [prompt], options)
    steps = 0
    for event in generation.stream(tiny_dia.codec, first_chunk_frames=first):
        if isinstance(event, Step):
            steps = event.index
        else:
            assert isinstance(event, AudioChunk) and len(event.audio) == block_end * 512 - DELAY
            break
    assert steps == D + block_end


def test_an_item_that_ends_early_still_gets_its_last_chunk(tiny_dia):
    """An item shorter than the first chunk comes out whole, at its end, marked last."""
    generation = tiny_dia.start([TEXT], None, GenerationOptions(temperature=0, max_new_tokens=3))
    chunks = [e for e in generation.stream(tiny_dia.codec, first_chunk_frames=64) if not isinstance(e, Step)]
    assert [c.last for c in chunks] == [True] and len(chunks[0].audio) == 3 * 512


def test_an_item_with_no_audio_ends_with_an_empty_last_chunk(tiny_dia, ends_at_once):
    options = GenerationOptions(temperature=0, max_new_tokens=30)
    generation = tiny_dia.start([TEXT, "[S2] Two."], None, options)
    ends_at_once.add(generation.items[0])
    chunks = [e for e in generation.stream(tiny_dia.codec) if not isinstance(e, Step)]
    assert (chunks[0].item, len(chunks[0].audio), chunks[0].last) == (0, 0, True)
    assert all(c.item == 1 for c in chunks[1:]) and sum(len(c.audio) for c in chunks[1:]) == 30 * 512
    ends_at_once.clear()  # every item from here on
    assert list(tiny_dia.generate_batch_stream([TEXT], temperature=0)) == []
    assert len(tiny_dia.generate(TEXT, temperature=0)) == 0


def test_stream_callback_counts_every_step(tiny_dia):
    calls = []
    list(
        tiny_dia.generate_stream(
            TEXT, temperature=0, max_new_tokens=12, callback=lambda s, t: calls.append((s, t))
        )
    )
    assert [s for s, _ in calls] == list(range(1, 12 + D + 2))  # EOS row 13, then D rows of tail
    assert {t for _, t in calls} == {calls[0][1]} and calls[-1][0] <= calls[0][1]


def test_stream_refuses_bad_requests_before_the_first_chunk(tiny_dia):
    with pytest.raises(ValueError, match="first_chunk_frames"):
        tiny_dia.generate_stream(TEXT, first_chunk_frames=0)
    with pytest.raises(ValueError, match="chunk_frames"):
        tiny_dia.generate_stream(TEXT, chunk_frames=-3)
    with pytest.raises(ValueError, match="top_p"):
        tiny_dia.generate_stream(TEXT, top_p=1.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tiny_dia.generate_stream(TEXT, temprature=0.5)
    with pytest.raises(TypeError, match="generate_batch_stream"):
        tiny_dia.generate_stream([TEXT])
    with pytest.raises(TypeError, match="list of texts"):
        tiny_dia.generate_batch_stream(TEXT)
    with pytest.raises(ValueError, match="long_form"):
        tiny_dia.generate_stream("[S1] " + "word " * 40)
    # nothing was left half-done: the next request streams as usual
    assert len(joined(tiny_dia.generate_stream(TEXT, temperature=0, max_new_tokens=5))) == 5 * 512
