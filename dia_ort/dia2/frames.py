"""nari-labs/dia2's generation loop (`runtime/generator.py` at 8687268): one generation's frames.

Per frame (docs/dia2.md section 5): the backbone steps the conditional and unconditional rows; the
guided action goes through the state machine, which gives the frame's text tokens; codebook 0 is
sampled, then each depformer stage's codebook in turn. A frame's codes are final once every delayed
codebook has reached it, which is when the stream decodes them. `FrameLoop` is one generation's side
of a frame, in phases; the graphs run in `batch.FrameBatch`, for one generation or many together.

Text may arrive while the loop runs: before each frame the loop reads pieces until the machine holds
the words it can look at (the next word and `second_stream_ahead` more), so it meets the entries the
whole script would give, at the same frames.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dia_ort.dia2.prefix import PrefixPlan
from dia_ort.dia2.sampling import Draw, SamplingConfig, guide, mask_ids, sample
from dia_ort.dia2.script import ScriptReader
from dia_ort.dia2.state_machine import StateMachine, TokenIds
from dia_ort.dia2_config import Dia2Config

UNGENERATED = -2
MAX_PADDING = 6  # the reference's state machine: pads a word may wait before a new word is forced


class FrameLoop:
    """One generation's side of each frame: `begin()` (False at its end) gives the rows to feed, `frame`
    at `t` into cache slot `slot`; `take_backbone` samples the text and codebook 0 from the backbone's
    outputs, `take_stage` each depformer stage's codebook (fed `code` and `text_tokens`), `end_frame` closes
    the frame. A prefix's frames (`prefill`) are fed before the first frame."""

    def __init__(
        self,
        config: Dia2Config,
        ids: TokenIds,
        reader: ScriptReader,
        pieces: Iterator[str],
        sampling: tuple[SamplingConfig, SamplingConfig, float, int, int],
        draw: Draw,
        prefix: PrefixPlan | None = None,
    ) -> None:
        c = self.config = config
        self.ids, self.reader, self.pieces, self.draw = ids, reader, pieces, draw
        self.text, self.audio_sampling, self.cfg_scale, self.cfg_filter_k, self.initial_padding = sampling
        self.machine = StateMachine(ids, c.second_stream_ahead, MAX_PADDING, self.initial_padding)
        self.state = self.machine.new_state(prefix.entries if prefix else [])
        self.prefix_words = len(prefix.entries) if prefix else 0
        self.reading = True
        self.delays = np.array(c.delay_pattern)
        frames = prefix.codes.shape[-1] if prefix else 0
        held = frames + int(self.delays.max()) if prefix else 0  # the prefix's delayed columns
        self.codes = np.full((c.codebooks, c.max_context_steps + held + 1), UNGENERATED, np.int64)  # delayed
        self.frame = np.full((2, c.channels), ids.pad, np.int64)
        self.frame[0, 0], self.frame[1, 0] = ids.bos, ids.zero
        self.start = max(frames - 1, 0)  # the reference feeds the prefix's last frame again, a slot later
        self.shift = 1 if frames else 0
        self.t, self.end, self.last = self.start, None, self.start - 1
        self.first_word: int | None = None  # the first word's frame less the initial padding
        self.code = 0  # the codebook sampled last in this frame
        self.prefill: np.ndarray | None = None  # the prefix's rows `[2, frames, channels]`, to feed first
        if prefix is not None and frames:
            self.codes[:, :held] = c.audio_pad_id
            for k, delay in enumerate(self.delays):
                self.codes[k, delay : delay + frames] = prefix.codes[k]
            self.prefill = self._prefix_rows(prefix)

    def begin(self) -> bool:
        """Read the script as far as this frame looks and set `frame`; False at the end: past the script
        (and its delays), or at the model's window (the reference runs max_context_steps frames after
        the prefix, but its RoPE ends there)."""
        c, ids, t = self.config, self.ids, self.t
        if t >= min(self.start + c.max_context_steps, c.max_context_steps) or (
            self.end is not None and t >= self.end
        ):
            return False
        self._read()
        frame = self.frame
        frame[:, 2:] = np.where(self.delays > t, c.audio_bos_id, self.codes[:, t])
        frame[1, :2] = ids.zero, ids.pad
        return True

    @property
    def slot(self) -> int:
        """The cache slot this frame is written to (one past its position after a prefix)."""
        return self.t + self.shift

    def take_backbone(self, action_logits: np.ndarray, cb0_logits: np.ndarray) -> None:
        """The frame's text action (through the state machine) and codebook 0, from the backbone's
        outputs for this generation's two rows."""
        c, ids, t = self.config, self.ids, self.t
        main, second = self.machine.process(
            t, self.state, sample(self._guide(action_logits), self.text, self.draw)
        )
        second = ids.pad if second == -1 else second
        if self.first_word is None and main == ids.new_word:
            self.first_word = t - self.initial_padding
        self.frame[:, 0], self.frame[:, 1] = main, second
        cb0 = mask_ids(self._guide(cb0_logits), (c.audio_pad_id, c.audio_bos_id))
        self.codes[0, t + 1] = self.code = sample(cb0, self.audio_sampling, self.draw)

    @property
    def text_tokens(self) -> np.ndarray:
        """The frame's text tokens `[2, 2]` (main, second; both rows), which the depformer may embed."""
        return np.array([self.frame[0, :2]] * 2)

    def take_stage(self, stage: int, logits: np.ndarray) -> None:
        """Sample codebook `stage + 1` from that depformer stage's logits for this generation's rows."""
        self.codes[stage + 1, self.t + 1] = self.code = sample(
            self._guide(logits), self.audio_sampling, self.draw
        )

    def end_frame(self) -> None:
        self.last, self.t = self.t, self.t + 1
        if self.end is None and self.state.end_step is not None:
            self.end = self.state.end_step + int(self.delays.max()) + MAX_PADDING

    @property
    def final_frames(self) -> int:
        """Frames whose codes are all known (every codebook's delayed column has been written)."""
        return max(0, min(self.last + 2, self.codes.shape[-1]) - int(self.delays.max()))

    def aligned(self, start: int, stop: int) -> np.ndarray:
        """The codes of frames start..stop-1, undelayed `[K, stop - start]`; ungenerated ones are pad."""
        columns = np.stack([self.codes[k, start + d : stop + d] for k, d in enumerate(self.delays)])
        return np.where(columns == UNGENERATED, self.config.audio_pad_id, columns)

    def _prefix_rows(self, prefix: PrefixPlan) -> np.ndarray:
        """The prefix's frames `[2, frames, channels]`, the machine forced to its words' frames: each
        frame's audio is the clip's (BOS before a codebook's delay), its text what the machine gave the
        frame before. The frames are known in advance, so they are fed in calls of many frames."""
        c, ids, frames = self.config, self.ids, prefix.codes.shape[-1]
        rows = np.empty((2, frames, c.channels), np.int64)
        for t in range(frames):
            for k, delay in enumerate(self.delays):
                self.frame[:, 2 + k] = prefix.codes[k, t - delay] if t >= delay else c.audio_bos_id
            rows[:, t] = self.frame
            self._read()  # a prefix word's start looks ahead into the script, as any word's does
            action = ids.new_word if t in prefix.new_word_steps else ids.pad
            main, second = self.machine.process(t, self.state, action, forced=True)
            self.frame[0, :2] = main, ids.pad if second == -1 else second
            self.frame[1, :2] = ids.zero, ids.pad
        return rows

    def _guide(self, logits: np.ndarray) -> np.ndarray:
        return guide(logits, self.cfg_scale, self.cfg_filter_k)

    def _read(self) -> None:
        """Pieces of text until the machine holds the next word and `second_stream_ahead` more."""
        entries = self.state.entries
        while self.reading and sum(1 for e in entries if e.tokens) <= self.config.second_stream_ahead:
            piece = next(self.pieces, None)
            if piece is None:
                entries.extend(self.reader.close())
                self.reading = False
                if self.t == 0 and not entries:
                    raise ValueError("script is empty: give the text to speak, e.g. '[S1] Hello there.'")
            else:
                if not isinstance(piece, str):
                    raise TypeError(f"the script's pieces must be strings, got {type(piece).__name__}")
                entries.extend(self.reader.feed(piece))
