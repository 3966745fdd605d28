"""One item's decoder rows (docs/generation.md section 8): its known cells, what was sampled, its end.

An item's known cells (BOS and its audio prompt, laid out by the delay pattern) are fixed in advance;
its known rows are prefilled, PREFILL_CHUNK rows per call, then each step samples one row, keeps
known cells, applies EOS forcing, and feeds the row back. An item finishes D rows after its channel 0
produced EOS (or its budget ran out). The text rows of an item are a CFG pair: unconditional, then
conditional.
"""

from __future__ import annotations

import logging

import numpy as np

from dia_ort.config import ModelConfig
from dia_ort.delay import UNKNOWN, known_prefix, known_rows, undo_delay
from dia_ort.options import GenerationOptions
from dia_ort.sampling import next_tokens

# Known rows per step-graph call. A long prefill (a voice prompt, a long-form part's context) runs in
# chunks, so the decoding loop runs the other requests' steps between them. Larger chunks gain little:
# 861 frames of full int8 prefilled in 4.2-4.4 s in chunks of 64, 3.96-3.99 s of 128 and 3.78-3.88 s
# of 256 (AMX Xeon, 2 threads), where a chunk of 256 would hold the other streams 4x as long.
PREFILL_CHUNK = 64
PAIR = 2  # decoder rows per item: its CFG pair, unconditional then conditional


def prefill_chunks(rows: int) -> list[tuple[int, int]]:
    """The (start, end) ranges a prefill of `rows` known rows runs in, PREFILL_CHUNK rows at a time."""
    return [(start, min(start + PREFILL_CHUNK, rows)) for start in range(0, rows, PREFILL_CHUNK)]


log = logging.getLogger(__name__)


def frame_budget(config: ModelConfig, prompt_frames: int, max_new_tokens: int, frame_rate: float) -> int:
    """Output frames an item may produce: max_new_tokens, clamped so prompt + output + delay fit.

    `frame_rate` (frames a second) is for the error message only.
    """
    room = config.audio_room - prompt_frames
    if room < 1:
        raise ValueError(
            f"audio prompt of {prompt_frames} frames leaves no room in the model's audio window of "
            f"{config.audio_length} rows; use a prompt shorter than "
            f"{config.audio_room} frames ({config.audio_room / frame_rate:.1f} s)"
        )
    if max_new_tokens > room:
        log.warning(
            "max_new_tokens=%d does not fit the audio window with a %d-frame prompt; generating at most %d frames",
            max_new_tokens,
            prompt_frames,
            room,
        )
    return min(max_new_tokens, room)


class ItemState:
    """One item's decoder rows: its known cells (BOS and its audio prompt), what was sampled, its EOS.

    Rows are produced one at a time by `place`; the item is finished max_delay rows after its channel
    0 produced EOS, or after its frame budget forced it.
    """

    def __init__(
        self, config: ModelConfig, prompt: np.ndarray | None, max_new_tokens: int, frame_rate: float
    ) -> None:
        self.config = config
        self.known = known_rows(prompt, config)
        self.prompt_frames = 0 if prompt is None else len(prompt)
        # channel 0 is forced to EOS on this row when the item has not ended by then
        budget = frame_budget(config, self.prompt_frames, max_new_tokens, frame_rate)
        self.last_row = self.prompt_frames + 1 + budget
        self.eos_row: int | None = None
        self.rows = np.full((self.slots, config.num_channels), config.pad_id, dtype=np.int64)
        self.rows[: len(self.known)] = np.where(self.known == UNKNOWN, config.pad_id, self.known)
        self.prefill = known_prefix(self.known)  # rows known before generation starts

    @property
    def slots(self) -> int:
        """Rows this item can fill: up to its last row and the max_delay rows of its EOS tail."""
        return self.last_row + self.config.max_delay + 1

    def sample(
        self, row: int, pair: np.ndarray, options: GenerationOptions, rng: np.random.Generator
    ) -> np.ndarray:
        """Produce `row` from the item's CFG pair of logits `[2, C, V]` (unconditional, conditional):
        sample it with guidance, then `place` it. Both decoding loops step an item through here."""
        sampled = next_tokens(pair[1:2], pair[0:1], options, self.config, rng)[0]
        return self.place(row, sampled)

    def place(self, row: int, sampled: np.ndarray) -> np.ndarray:
        """Write `row` from `[C]` sampled tokens: known cells win, then EOS/PAD forcing after EOS."""
        config = self.config
        delays = np.asarray(config.delay_pattern)
        tokens = sampled.copy()
        if row < len(self.known):
            tokens = np.where(self.known[row] == UNKNOWN, tokens, self.known[row])
        if self.eos_row is None and (tokens[0] == config.eos_id or row >= self.last_row):
            self.eos_row = row
        if self.eos_row is not None:
            tokens = np.where(row == self.eos_row + delays, config.eos_id, tokens)
            tokens = np.where(row > self.eos_row + delays, config.pad_id, tokens)
        self.rows[row] = tokens
        return tokens

    def finished(self, row: int) -> bool:
        """Whether `row` was the item's last (the end of its EOS tail)."""
        return self.eos_row is not None and row >= self.eos_row + self.config.max_delay

    def final_frames(self, row: int) -> int:
        """How many output frames no later step can change once `row` was produced.

        Frame k is final once row k + 1 + P + max_delay exists (its last channel is then written);
        after EOS only the frames before it belong to the output.
        """
        frames = max(0, row - self.prompt_frames - self.config.max_delay)
        return frames if self.eos_row is None else min(frames, self.eos_row - 1 - self.prompt_frames)

    def codes(self, frames: int | None = None) -> np.ndarray:
        """The first `frames` output frames `[frames, C]` (all of them when None), delay undone."""
        if frames is None:
            if self.eos_row is None:
                raise RuntimeError("the generation was not run to the end")
            frames = self.eos_row - 1 - self.prompt_frames
        return undo_delay(self.rows, self.config, self.prompt_frames, frames)


def cfg_text_rows(texts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Byte ids -> `[2B, L]` ids and mask: row 2i unconditional (all zeros), row 2i+1 the text.

    Both rows of an item use the text's mask, as the reference does.
    """
    length = max(len(t) for t in texts)
    ids = np.zeros((2 * len(texts), length), dtype=np.int64)
    mask = np.zeros((2 * len(texts), length), dtype=bool)
    for i, text in enumerate(texts):
        ids[2 * i + 1, : len(text)] = text
        mask[2 * i : 2 * i + 2, : len(text)] = True
    return ids, mask
