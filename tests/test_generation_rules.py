"""The step loop's rules (docs/generation.md sections 6 and 8) without a model: the frame budget, the
CFG text rows, one item's rows (`ItemState`) against the rules written out cell by cell, and
`Generation` driving a scripted decoder whose every call is recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from test_delay import CONFIG, D, frames

from dia_ort.delay import UNKNOWN
from dia_ort.generation import Generation, ItemState, cfg_text_rows, frame_budget
from dia_ort.manifest import CodecConfig
from dia_ort.options import GenerationOptions

EOS, PAD, BOS = CONFIG.eos_id, CONFIG.pad_id, CONFIG.bos_id
ROOM = CONFIG.audio_length - D - 2  # without a prompt
FRAME_RATE = CodecConfig().frame_rate  # 86.13


def expected_rows(prompt: np.ndarray, sampled: np.ndarray, eos_row: int) -> np.ndarray:
    """Rows 0..eos_row + D by the rules: BOS, the prompt, sampled codes, then EOS at eos_row + d[c], PAD."""
    rows = np.zeros((eos_row + D + 1, CONFIG.num_channels), dtype=np.int64)
    for t in range(len(rows)):
        for c, d in enumerate(CONFIG.delay_pattern):
            frame = t - 1 - d
            if t <= d:
                rows[t, c] = BOS
            elif frame < len(prompt):
                rows[t, c] = prompt[frame, c]
            elif t < eos_row + d:
                rows[t, c] = sampled[t, c]
            else:
                rows[t, c] = EOS if t == eos_row + d else PAD
    return rows


def run_item(item: ItemState, sampled: np.ndarray) -> list[np.ndarray]:
    """Place rows from the prefill on until the item is finished; what `place` returned for each."""
    placed = []
    for row in range(item.prefill, item.slots):
        placed.append(item.place(row, sampled[row]))
        if item.finished(row):
            break
    return placed


def codes_for(prompt_frames: int, eos_row: int, seed: int = 0) -> np.ndarray:
    """Sampled audio codes for every row, with channel 0's EOS at `eos_row` only."""
    sampled = frames(CONFIG.audio_length, seed=seed)
    sampled[eos_row, 0] = EOS
    return sampled


def test_frame_budget_is_max_new_tokens_within_the_room():
    assert frame_budget(CONFIG, 0, 10, FRAME_RATE) == 10
    assert frame_budget(CONFIG, 0, ROOM, FRAME_RATE) == ROOM
    assert frame_budget(CONFIG, 5, ROOM, FRAME_RATE) == ROOM - 5


def test_frame_budget_clamps_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dia_ort.generation"):
        assert frame_budget(CONFIG, 0, ROOM, FRAME_RATE) == ROOM
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dia_ort.generation"):
        assert frame_budget(CONFIG, 3, ROOM, FRAME_RATE) == ROOM - 3
    assert caplog.messages == [
        f"max_new_tokens={ROOM} does not fit the audio window with a 3-frame prompt; "
        f"generating at most {ROOM - 3} frames"
    ]


def test_a_prompt_that_leaves_no_room_is_refused():
    assert frame_budget(CONFIG, ROOM - 1, 100, FRAME_RATE) == 1
    with pytest.raises(ValueError) as error:
        frame_budget(CONFIG, ROOM, 100, FRAME_RATE)
    message = str(error.value)
    assert f"prompt of {ROOM} frames" in message and f"audio window of {CONFIG.audio_length} rows" in message
    assert f"shorter than {ROOM} frames ({ROOM / 86.13:.1f} s)" in message
    with pytest.raises(ValueError, match=r"shorter than 13 frames \(0\.2 s\)$"):  # 13 / 86.13 frames a second
        frame_budget(replace(CONFIG, audio_length=13 + D + 2), 13, 100, FRAME_RATE)


def test_cfg_text_rows_pair_an_unconditional_row_with_each_text():
    texts = [np.array([5, 6, 7]), np.array([9, 8]), np.array([4])]
    ids, mask = cfg_text_rows(texts)
    np.testing.assert_array_equal(ids, [[0, 0, 0], [5, 6, 7], [0, 0, 0], [9, 8, 0], [0, 0, 0], [4, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    assert ids.dtype == np.int64 and mask.dtype == bool


def test_a_fresh_item_holds_its_known_cells_and_pad_elsewhere():
    prompt = frames(4)
    item = ItemState(CONFIG, prompt, max_new_tokens=10, frame_rate=FRAME_RATE)
    assert (item.prompt_frames, item.prefill, item.last_row) == (4, 5, 4 + 1 + 10)
    assert item.eos_row is None and item.slots == item.last_row + D + 1 == len(item.rows)
    assert item.rows.dtype == np.int64  # token ids, as the decoder takes them
    known = expected_rows(prompt, np.full((64, 9), UNKNOWN), eos_row=40)[: 4 + D + 1]
    np.testing.assert_array_equal(item.rows[: len(known)], np.where(known == UNKNOWN, PAD, known))
    assert (item.rows[len(known) :] == PAD).all()


@pytest.mark.parametrize(("prompt_frames", "eos_row"), [(0, 1), (0, 12), (3, 4), (3, 30)])
def test_item_rows_follow_the_rules(prompt_frames, eos_row):
    """Known cells win over what was sampled, EOS at eos_row + d[c] and PAD after it."""
    prompt = frames(prompt_frames, seed=2)
    sampled = codes_for(prompt_frames, eos_row)
    item = ItemState(CONFIG, prompt if prompt_frames else None, max_new_tokens=40, frame_rate=FRAME_RATE)
    placed = run_item(item, sampled)
    expected = expected_rows(prompt, sampled, eos_row)
    assert item.eos_row == eos_row
    np.testing.assert_array_equal(np.stack(placed), expected[item.prefill :])
    np.testing.assert_array_equal(item.rows[: len(expected)], expected)
    output = eos_row - 1 - prompt_frames
    codes = item.codes()
    assert codes.shape == (output, CONFIG.num_channels)
    for c, d in enumerate(CONFIG.delay_pattern):  # frame k of channel c was sampled at row k + 1 + P + d[c]
        np.testing.assert_array_equal(codes[:, c], sampled[1 + prompt_frames + d : eos_row + d, c])


def test_the_budget_forces_eos_on_the_last_row():
    sampled = frames(CONFIG.audio_length, seed=3)  # channel 0 never samples EOS
    item = ItemState(CONFIG, None, max_new_tokens=6, frame_rate=FRAME_RATE)
    placed = run_item(item, sampled)
    assert item.eos_row == item.last_row == 7
    assert len(placed) == 7 + D  # rows 1 .. 7 + D
    assert item.codes().shape == (6, CONFIG.num_channels)
    np.testing.assert_array_equal(item.rows[: 7 + D + 1], expected_rows(np.zeros((0, 9)), sampled, 7))


def test_an_item_is_finished_d_rows_after_eos():
    item = ItemState(CONFIG, None, max_new_tokens=40, frame_rate=FRAME_RATE)
    sampled = codes_for(0, 10)
    finished = []
    for row in range(1, 10 + D + 1):
        item.place(row, sampled[row])
        finished.append(item.finished(row))
    assert finished == [False] * (10 + D - 1) + [True]


def test_codes_before_the_end_is_an_error():
    item = ItemState(CONFIG, None, max_new_tokens=40, frame_rate=FRAME_RATE)
    item.place(1, frames(1)[0])
    with pytest.raises(RuntimeError, match="^the generation was not run to the end$"):
        item.codes()


@pytest.mark.parametrize("prompt_frames", [0, 2])
def test_final_frames_are_those_whose_last_channel_is_written(prompt_frames):
    """Frame k is final once row k + 1 + P + D exists; after EOS only frames before it count."""
    eos_row = prompt_frames + 20
    item = ItemState(
        CONFIG, frames(prompt_frames) if prompt_frames else None, max_new_tokens=40, frame_rate=FRAME_RATE
    )
    sampled = codes_for(prompt_frames, eos_row)
    final = []
    for row in range(item.prefill, eos_row + D + 1):
        item.place(row, sampled[row])
        output_so_far = sum(1 for k in range(40) if k + 1 + prompt_frames + D <= row)
        assert item.final_frames(row) == min(output_so_far, eos_row - 1 - prompt_frames)
        final.append(item.codes(item.final_frames(row)))
    for codes in final:  # what a stream hands out is never changed by a later row
        np.testing.assert_array_equal(codes, item.codes()[: len(codes)])


@dataclass
class ScriptedDecoder:
    """Stands in for `Engine` and its decoder state: cond logits make channel 0 say EOS at the row
    `eos_rows[i]` for item i; otherwise they peak at code A = (row * 7 + c) % 1000 and next at
    B = A + 500, where the uncond logits are low, so guidance (cfg_filter_top_k=1) picks B, while
    cond alone, or swapped rows, would pick A. Every call is recorded."""

    eos_rows: list[int]
    config: object = CONFIG
    frame_rate: float = FRAME_RATE
    calls: list[tuple[np.ndarray, int]] = field(default_factory=list)
    started: list[tuple] = field(default_factory=list)

    def start(self, text_ids, text_mask, slots, graph=False):
        self.started.append((text_ids, text_mask, slots, graph))
        return self

    def step(self, tokens: np.ndarray, start: int) -> np.ndarray:
        self.calls.append((tokens.copy(), start))
        row = start + tokens.shape[1]  # the row these logits predict
        logits = np.zeros((tokens.shape[0], CONFIG.num_channels, CONFIG.vocab_size), dtype=np.float32)
        for c in range(CONFIG.num_channels):
            logits[:, c, (row * 7 + c) % 1000] = 5.0
            logits[1::2, c, (row * 7 + c) % 1000 + 500] = 4.0
        for i, eos_row in enumerate(self.eos_rows):
            if row == eos_row:
                logits[2 * i + 1, 0, EOS] = 10.0
        return logits


def test_generation_prefills_then_feeds_each_row_back_until_every_item_is_finished():
    prompts = [None, frames(3, seed=4)]
    decoder = ScriptedDecoder(eos_rows=[6, 12])
    options = GenerationOptions(temperature=0, max_new_tokens=30, cfg_filter_top_k=1)
    generation = Generation(decoder, [np.array([7, 8]), np.array([9])], prompts, options, cuda_graph=True)
    steps = list(generation)

    text_ids, text_mask, slots, graph = decoder.started[0]
    np.testing.assert_array_equal(text_ids, [[0, 0], [7, 8], [0, 0], [9, 0]])
    assert mask_rows(text_mask) == [2, 2, 1, 1] and graph is True
    assert slots == max(1 + 30, 3 + 1 + 30) + D + 1

    # the prefill is row 0, which both items know (item 1 knows 4 rows), each row given to both CFG rows
    prefill, start = decoder.calls[0]
    assert start == 0 and prefill.shape == (4, 1, CONFIG.num_channels)
    assert (prefill == BOS).all()
    assert [s.row for s in steps] == list(range(1, 12 + D + 1))
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert {s.total for s in steps} == {3 + 1 + 30 + D}  # the longest item's last row + D, from row 1
    for step, (fed, start) in zip(steps, decoder.calls[1:], strict=False):
        assert start == step.row and fed.shape == (4, 1, CONFIG.num_channels)
        np.testing.assert_array_equal(fed[:, 0], np.repeat(step.tokens, 2, axis=0))
    assert len(decoder.calls) == len(steps)  # the last row is not fed back

    finished = np.array([s.finished for s in steps])
    assert finished[:, 0].argmax() == steps.index(next(s for s in steps if s.row == 6 + D))
    assert finished[-1].all() and not finished[-2].all()
    after = [s.tokens[0] for s in steps if s.row > 6 + D]
    assert after and all((tokens == PAD).all() for tokens in after)

    codes = generation.codes()
    assert [len(c) for c in codes] == [6 - 1, 12 - 1 - 3]
    expected = [
        [(k + 1 + p + d) * 7 + c for c, d in enumerate(CONFIG.delay_pattern)]
        for p, n in ((0, 5), (3, 8))
        for k in range(n)
    ]
    np.testing.assert_array_equal(np.concatenate(codes), np.array(expected) % 1000 + 500)


def test_an_item_finished_early_gets_pad_rows_past_its_own_slots():
    """Item 0 (no prompt) ends at its budget 3 rows before item 1 (3 prompt frames) and has 3 rows
    fewer; until item 1 is finished, item 0's rows are PAD."""
    decoder = ScriptedDecoder(eos_rows=[])
    options = GenerationOptions(temperature=0, max_new_tokens=5, cfg_filter_top_k=1)
    generation = Generation(decoder, [np.array([1]), np.array([2])], [None, frames(3)], options)
    steps = list(generation)
    assert steps[-1].row == 3 + 1 + 5 + D and generation.items[0].slots == 1 + 5 + D + 1
    assert all((s.tokens[0] == PAD).all() for s in steps if s.row > 1 + 5 + D)
    assert [len(c) for c in generation.codes()] == [5, 5]


def mask_rows(mask: np.ndarray) -> list[int]:
    return mask.sum(axis=1).tolist()


def test_a_seeded_generation_draws_the_same_tokens():
    def tokens(seed):
        decoder = ScriptedDecoder(eos_rows=[40])
        options = GenerationOptions(temperature=1.0, max_new_tokens=8, seed=seed)
        steps = list(Generation(decoder, [np.array([1])], [None], options))
        assert decoder.started[0][3] is False  # no CUDA graph unless asked
        return np.stack([s.tokens for s in steps])

    np.testing.assert_array_equal(tokens(3), tokens(3))
    assert not np.array_equal(tokens(3), tokens(4))


def test_each_item_of_a_seeded_batch_samples_the_tokens_it_would_alone():
    """One generator per item, each from the seed (docs section 8): item i of a batch gets the tokens
    a generation of item i alone gets; with one shared generator the three items would differ."""

    def tokens(eos_rows, prompts):
        decoder = ScriptedDecoder(eos_rows=eos_rows)
        options = GenerationOptions(temperature=1.0, max_new_tokens=8, seed=11)
        texts = [np.array([1])] * len(prompts)
        return np.stack([s.tokens for s in Generation(decoder, texts, prompts, options)])

    alone = tokens([40], [None])
    batch = tokens([40, 40, 40], [None, None, None])
    for i in range(3):
        np.testing.assert_array_equal(batch[:, i], alone[:, 0])
