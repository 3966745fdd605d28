"""The decoding loop: one streaming iterator of steps that every entry point consumes (docs/generation.md section 8).

A batch of items shares decoder positions. Each item's known cells (BOS and its audio prompt, laid
out by the delay pattern) are fixed in advance; the rows every item knows are prefilled, PREFILL_CHUNK
rows per call, then each step samples one row, keeps known cells, applies EOS forcing, and feeds the row
back. An item finishes D rows after its channel 0 produced EOS (or its budget ran out). `ItemState`
holds one item's part of that, so that the continuous-batching scheduler runs items the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dia_ort.config import ModelConfig
from dia_ort.delay import UNKNOWN, known_prefix, known_rows, undo_delay
from dia_ort.engine import Engine
from dia_ort.options import GenerationOptions
from dia_ort.sampling import next_tokens

# Known rows per step-graph call. A long prefill (a voice prompt, a long-form part's context) runs in
# chunks, so the scheduler can run the other requests' steps between them; `generate` prefills in the
# same chunks, so a request gets the same numbers alone as in a server's batch.
PREFILL_CHUNK = 64


def prefill_chunks(rows: int) -> list[tuple[int, int]]:
    """The (start, end) ranges a prefill of `rows` known rows runs in, PREFILL_CHUNK rows at a time."""
    return [(start, min(start + PREFILL_CHUNK, rows)) for start in range(0, rows, PREFILL_CHUNK)]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One decoder step: `row` was just produced for every item (`tokens` `[B, C]`)."""

    index: int  # 1-based number of this step
    total: int  # the most steps this request can take
    row: int
    tokens: np.ndarray
    finished: np.ndarray  # [B] bool


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


class Generation:
    """One batched request. Iterate it for `Step`s; afterwards `codes()` gives each item's frames."""

    def __init__(
        self,
        engine: Engine,
        texts: list[np.ndarray],
        prompts: list[np.ndarray | None],
        options: GenerationOptions,
        cuda_graph: bool = False,
    ) -> None:
        self.cuda_graph = cuda_graph  # run one-row steps on fixed buffers as a CUDA graph (engine.py)
        self.engine, self.config, self.options = engine, engine.config, options
        self.items = [ItemState(engine.config, p, options.max_new_tokens, engine.frame_rate) for p in prompts]
        self.text_ids, self.text_mask = cfg_text_rows(texts)
        self.slots = max(item.slots for item in self.items)

    def __iter__(self) -> Iterator[Step]:
        config = self.config
        batch = len(self.items)
        # a generator per item, each from the seed: an item samples the tokens it would sample alone
        rngs = [np.random.default_rng(self.options.seed) for _ in self.items]
        state = self.engine.start(self.text_ids, self.text_mask, self.slots, graph=self.cuda_graph)
        prefill = min(item.prefill for item in self.items)
        total = max(item.last_row + config.max_delay for item in self.items) - prefill + 1
        finished = np.zeros(batch, dtype=bool)
        known = np.repeat(np.stack([item.rows[:prefill] for item in self.items]), 2, axis=0)
        for start, end in prefill_chunks(prefill):
            logits = state.step(known[:, start:end], start)
        for index, row in enumerate(range(prefill, self.slots), start=1):
            tokens = np.full((batch, config.num_channels), config.pad_id, dtype=np.int64)
            for i, (item, rng) in enumerate(zip(self.items, rngs, strict=True)):
                if not finished[i]:
                    tokens[i] = item.sample(row, logits[2 * i : 2 * i + 2], self.options, rng)
                    finished[i] = item.finished(row)
            yield Step(index=index, total=total, row=row, tokens=tokens.copy(), finished=finished.copy())
            if finished.all():
                return
            logits = state.step(np.repeat(tokens[:, None], 2, axis=0), row)

    def codes(self) -> list[np.ndarray]:
        """Each item's `[T, C]` audio codes after its prompt, delay undone (after iterating)."""
        return [item.codes() for item in self.items]


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
