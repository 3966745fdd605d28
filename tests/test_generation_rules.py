"""The step loop's rules (docs/generation.md sections 6 and 8) without a model: the frame budget, the
CFG text rows, one item's rows (`ItemState`) against the rules written out cell by cell, and
the decoding loop (`Decoding`) driving scripted cache rows whose every call is recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pytest
from test_delay import CONFIG, D, frames

from dia_ort.decoding import Decoding, Request
from dia_ort.delay import UNKNOWN
from dia_ort.item import ItemState, cfg_text_rows, frame_budget
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
    with caplog.at_level(logging.WARNING, logger="dia_ort.item"):
        assert frame_budget(CONFIG, 0, ROOM, FRAME_RATE) == ROOM
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dia_ort.item"):
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
class ScriptedRows:
    """Stands in for the cache rows (`decoding.Rows`): cond logits make channel 0 say EOS at the row
    `eos_rows[i]` for the i-th request that joined; otherwise they peak at code A = (row * 7 + c) % 1000
    and next at B = A + 500, where the uncond logits are low, so guidance (cfg_filter_top_k=1) picks B,
    while cond alone, or swapped rows, would pick A. Rows move as the host rows' do when a pair leaves.
    Every call is recorded."""

    eos_rows: list[int]
    rows: int = 0
    positions: np.ndarray = field(default_factory=lambda: np.zeros(16, dtype=np.int64))
    pairs: list[int] = field(default_factory=list)  # the request (by joining order) of each pair
    calls: list[tuple] = field(default_factory=list)

    def add(self, text_ids, text_mask):
        self.calls.append(("add", text_ids, text_mask))
        first, self.rows = self.rows, self.rows + len(text_ids)
        self.pairs += range(len(self.pairs), len(self.pairs) + len(text_ids) // 2)
        self.positions[first : self.rows] = 0
        return first

    def remove(self, first):
        self.calls.append(("remove", first))
        last = self.rows - 2
        self.pairs[first // 2] = self.pairs[last // 2]
        self.positions[first : first + 2] = self.positions[last : last + 2]
        del self.pairs[last // 2]
        self.rows = last
        return last if first != last else None

    def prefill(self, first, tokens):
        self.calls.append(("prefill", first, tokens.copy()))
        self.positions[first : first + len(tokens)] += tokens.shape[1]
        return self._logits(range(first, first + len(tokens)))

    def step(self, tokens, held):
        self.calls.append(("step", tokens.copy(), held.copy()))
        self.positions[: self.rows] += ~held
        return self._logits(range(self.rows))

    def close(self):
        self.calls.append(("close",))

    def _logits(self, rows):
        logits = np.zeros((len(rows), CONFIG.num_channels, CONFIG.vocab_size), dtype=np.float32)
        for k, r in enumerate(rows):
            row = self.positions[r]  # the row these logits predict
            for c in range(CONFIG.num_channels):
                logits[k, c, (row * 7 + c) % 1000] = 5.0
                if r % 2:
                    logits[k, c, (row * 7 + c) % 1000 + 500] = 4.0
            request = self.pairs[r // 2]
            if r % 2 and request < len(self.eos_rows) and row == self.eos_rows[request]:
                logits[k, 0, EOS] = 10.0
        return logits


def scripted_requests(texts, prompts, options):
    engine = SimpleNamespace(config=CONFIG, frame_rate=FRAME_RATE)
    return [
        Request.new(i, engine, t, p, options) for i, (t, p) in enumerate(zip(texts, prompts, strict=True))
    ]


def run_decoding(rows, requests):
    """Join `requests`, then step until none runs; the rows each request produced, step by step."""
    decoding = Decoding(rows, CONFIG.num_channels)
    decoding.join(requests)
    produced = [[r.row for r in requests]]
    while decoding.running:
        decoding.step()
        produced.append([r.row for r in requests])
    return produced


def test_decoding_prefills_then_feeds_each_row_back_until_every_request_is_finished():
    prompts = [None, frames(3, seed=4)]
    rows = ScriptedRows(eos_rows=[6, 12])
    options = GenerationOptions(temperature=0, max_new_tokens=30, cfg_filter_top_k=1)
    requests = scripted_requests([np.array([7, 8]), np.array([9])], prompts, options)
    produced = run_decoding(rows, requests)

    kind, text_ids, text_mask = rows.calls[0]  # one encoder run for both texts
    assert kind == "add"
    np.testing.assert_array_equal(text_ids, [[0, 0], [7, 8], [0, 0], [9, 0]])
    assert mask_rows(text_mask) == [2, 2, 1, 1]
    # each request prefills its known rows (1 and 4), each row given to both CFG rows
    (_, first0, known0), (_, first1, known1) = rows.calls[1:3]
    assert (first0, known0.shape, first1, known1.shape) == (0, (2, 1, 9), 2, (2, 4, 9))
    assert (known0 == BOS).all()
    np.testing.assert_array_equal(known1, np.repeat(requests[1].item.rows[None, :4], 2, axis=0))
    # then one row a step for each, fed back to both of its rows
    assert [p[0] for p in produced[: 6 + D]] == list(range(1, 6 + D + 1))
    assert [p[1] for p in produced[: 12 + D - 3]] == list(range(4, 12 + D + 1))
    steps = [c for c in rows.calls if c[0] == "step"]
    assert len(steps) == len(produced) - 1
    for (_, fed, held), before in zip(steps, produced, strict=False):
        assert not held.any()
        np.testing.assert_array_equal(fed[0::2], fed[1::2])  # both rows of a pair get its row
        np.testing.assert_array_equal(fed[-1, 0], requests[1].item.rows[before[1]])  # the last pair
    # request 0 leaves at its end: request 1's pair moves into its rows
    assert ("remove", 0) in rows.calls and rows.calls[-1] == ("remove", 0)
    assert all(r.done for r in requests) and rows.rows == 0

    codes = [r.codes() for r in requests]
    assert [len(c) for c in codes] == [6 - 1, 12 - 1 - 3]
    expected = [
        [(k + 1 + p + d) * 7 + c for c, d in enumerate(CONFIG.delay_pattern)]
        for p, n in ((0, 5), (3, 8))
        for k in range(n)
    ]
    np.testing.assert_array_equal(np.concatenate(codes), np.array(expected) % 1000 + 500)


def test_a_request_that_ends_leaves_and_the_others_go_on():
    """Request 0 ends at its budget; its pair is freed (the last pair moves in) and request 1 goes on
    to its own end with the same rows it gets alone."""
    options = GenerationOptions(temperature=0, max_new_tokens=5, cfg_filter_top_k=1)
    prompts = [None, frames(3)]
    together = scripted_requests([np.array([1]), np.array([2])], prompts, options)
    run_decoding(ScriptedRows(eos_rows=[]), together)
    alone = scripted_requests([np.array([2])], prompts[1:], options)
    run_decoding(ScriptedRows(eos_rows=[]), alone)
    np.testing.assert_array_equal(together[1].item.rows, alone[0].item.rows)
    assert [len(r.codes()) for r in together] == [5, 5]


def mask_rows(mask: np.ndarray) -> list[int]:
    return mask.sum(axis=1).tolist()


def test_a_seeded_request_draws_the_same_tokens():
    def tokens(seed):
        options = GenerationOptions(temperature=1.0, max_new_tokens=8, seed=seed)
        (request,) = scripted_requests([np.array([1])], [None], options)
        run_decoding(ScriptedRows(eos_rows=[40]), [request])
        return request.item.rows

    np.testing.assert_array_equal(tokens(3), tokens(3))
    assert not np.array_equal(tokens(3), tokens(4))


def test_each_request_of_a_seeded_batch_samples_the_tokens_it_would_alone():
    """One generator per request, each from the seed (docs section 8): request i of a batch gets the
    tokens a request of it alone gets; with one shared generator the three would differ."""

    def tokens(count):
        options = GenerationOptions(temperature=1.0, max_new_tokens=8, seed=11)
        requests = scripted_requests([np.array([1])] * count, [None] * count, options)
        run_decoding(ScriptedRows(eos_rows=[40] * count), requests)
        return [r.item.rows for r in requests]

    (alone,) = tokens(1)
    for rows in tokens(3):
        np.testing.assert_array_equal(rows, alone)
