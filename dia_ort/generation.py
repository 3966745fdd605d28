"""The decoding loop: one streaming iterator of steps that every entry point consumes (SPEC.md 5).

A batch of items shares decoder positions. Each item's known cells (BOS and its audio prompt, laid
out by the delay pattern) are fixed in advance; the rows every item knows are prefilled in one
call, then each step samples one row, keeps known cells, applies EOS forcing, and feeds the row
back. An item finishes D rows after its channel 0 produced EOS (or its budget ran out).
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One decoder step: `row` was just produced for every item (`tokens` `[B, C]`)."""

    index: int  # 1-based number of this step
    total: int  # the most steps this request can take
    row: int
    tokens: np.ndarray
    finished: np.ndarray  # [B] bool


def frame_budget(config: ModelConfig, prompt_frames: int, max_new_tokens: int) -> int:
    """Output frames an item may produce: max_new_tokens, clamped so prompt + output + delay fit."""
    room = config.audio_length - prompt_frames - config.max_delay - 2
    if room < 1:
        raise ValueError(
            f"audio prompt of {prompt_frames} frames leaves no room in the model's audio window of "
            f"{config.audio_length} rows; use a prompt shorter than "
            f"{config.audio_length - config.max_delay - 2} frames ({(config.audio_length - config.max_delay - 2) / 86.13:.1f} s)"
        )
    if max_new_tokens > room:
        log.warning(
            "max_new_tokens=%d does not fit the audio window with a %d-frame prompt; generating at most %d frames",
            max_new_tokens,
            prompt_frames,
            room,
        )
    return min(max_new_tokens, room)


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
        config = engine.config
        self.cuda_graph = cuda_graph  # run one-row steps on fixed buffers as a CUDA graph (engine.py)
        self.engine, self.config, self.options = engine, config, options
        self.known = [known_rows(p, config) for p in prompts]
        self.prompt_frames = [0 if p is None else len(p) for p in prompts]
        # channel 0 is forced to EOS on this row when the item has not ended by then
        self.last_row = [p + 1 + frame_budget(config, p, options.max_new_tokens) for p in self.prompt_frames]
        self.eos_row: list[int | None] = [None] * len(texts)
        slots = max(self.last_row) + config.max_delay + 1
        self.rows = np.full((len(texts), slots, config.num_channels), config.pad_id, dtype=np.int64)
        for i, grid in enumerate(self.known):
            self.rows[i, : len(grid)] = np.where(grid == UNKNOWN, config.pad_id, grid)
        self.text_ids, self.text_mask = cfg_text_rows(texts)
        self.slots = slots

    def __iter__(self) -> Iterator[Step]:
        config, delays = self.config, np.asarray(self.config.delay_pattern)
        batch = len(self.known)
        rng = np.random.default_rng(self.options.seed)
        state = self.engine.start(self.text_ids, self.text_mask, self.slots, graph=self.cuda_graph)
        prefill = min(known_prefix(grid) for grid in self.known)
        total = max(r + config.max_delay for r in self.last_row) - prefill + 1
        finished = np.zeros(batch, dtype=bool)
        logits = state.step(np.repeat(self.rows[:, :prefill], 2, axis=0), 0)
        for index, row in enumerate(range(prefill, self.slots), start=1):
            cond, uncond = logits[1::2], logits[0::2]
            tokens = next_tokens(cond, uncond, self.options, config, rng)
            for i in range(batch):
                tokens[i] = self._place(i, row, tokens[i], delays) if not finished[i] else config.pad_id
                eos = self.eos_row[i]
                finished[i] |= eos is not None and row >= eos + config.max_delay
            self.rows[:, row] = tokens
            yield Step(index=index, total=total, row=row, tokens=tokens.copy(), finished=finished.copy())
            if finished.all():
                return
            logits = state.step(np.repeat(tokens[:, None], 2, axis=0), row)

    def _place(self, item: int, row: int, sampled: np.ndarray, delays: np.ndarray) -> np.ndarray:
        """The cells of `row` for one item: known cells win, then EOS/PAD forcing after its EOS."""
        config = self.config
        grid = self.known[item]
        tokens = sampled.copy()
        if row < len(grid):
            tokens = np.where(grid[row] == UNKNOWN, tokens, grid[row])
        if self.eos_row[item] is None and (tokens[0] == config.eos_id or row >= self.last_row[item]):
            self.eos_row[item] = row
        eos = self.eos_row[item]
        if eos is not None:
            tokens = np.where(row == eos + delays, config.eos_id, tokens)
            tokens = np.where(row > eos + delays, config.pad_id, tokens)
        return tokens

    def final_frames(self, item: int, row: int) -> int:
        """How many of the item's output frames no later step can change once `row` was produced.

        Frame k is final once row k + 1 + P + max_delay exists (its last channel is then written);
        after EOS only the frames before it belong to the output.
        """
        prompt, eos = self.prompt_frames[item], self.eos_row[item]
        frames = max(0, row - prompt - self.config.max_delay)
        return frames if eos is None else min(frames, eos - 1 - prompt)

    def item_codes(self, item: int, frames: int) -> np.ndarray:
        """The item's first `frames` output frames `[frames, C]`, delay undone."""
        return undo_delay(self.rows[item], self.config, self.prompt_frames[item], frames)

    def codes(self) -> list[np.ndarray]:
        """Each item's `[T, C]` audio codes after its prompt, delay undone (after iterating)."""
        out = []
        for i, eos in enumerate(self.eos_row):
            if eos is None:
                raise RuntimeError("the generation was not run to the end")
            frames = eos - 1 - self.prompt_frames[i]
            out.append(undo_delay(self.rows[i], self.config, self.prompt_frames[i], frames))
        return out


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
