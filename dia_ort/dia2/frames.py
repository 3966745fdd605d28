"""nari-labs/dia2's generation loop (`runtime/generator.py` at 8687268), one frame at a time.

Per frame (docs/dia2.md section 5): the backbone steps the conditional and unconditional rows; the
guided action goes through the state machine, which gives the frame's text tokens; codebook 0 is
sampled, then each depformer stage's codebook in turn. A frame's codes are final once every delayed
codebook has reached it, which is when the stream decodes them.

Text may arrive while the loop runs: before each frame the loop reads pieces until the machine holds
the words it can look at (the next word and `second_stream_ahead` more), so it meets the entries the
whole script would give, at the same frames.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from dia_ort.dia2.prefix import PrefixPlan
from dia_ort.dia2.sampling import Draw, SamplingConfig, guide, mask_ids, sample
from dia_ort.dia2.script import ScriptReader
from dia_ort.dia2.stage_weights import StageWeights
from dia_ort.dia2.state_machine import StateMachine, TokenIds
from dia_ort.dia2_config import Dia2Config
from dia_ort.engine import bind_caches, grown_capacity

UNGENERATED = -2
MAX_PADDING = 6  # the reference's state machine: pads a word may wait before a new word is forced
PREFILL_FRAMES = 64  # prefix frames per backbone call


@dataclass(frozen=True)
class DecoderGraphs:
    """What a frame runs: the backbone step, the depformer stage and each stage's kernels."""

    backbone: ort.InferenceSession
    depformer: ort.InferenceSession
    stage_weights: StageWeights


class FrameLoop:
    """One generation: `step()` runs the next frame until it returns False."""

    def __init__(
        self,
        config: Dia2Config,
        graphs: DecoderGraphs,
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
        d, p = c.decoder, c.depformer
        self.backbone = _Caches(graphs.backbone, d.layers, (2, d.kv_heads, 0, d.head_dim))
        self.stages = _Caches(graphs.depformer, p.layers, (2, p.heads, max(c.depth, 1), p.head_dim))
        self.stage_weights = graphs.stage_weights
        self.start = max(frames - 1, 0)  # the reference feeds the prefix's last frame again, a slot later
        self.shift = 1 if frames else 0
        self.t, self.end, self.last = self.start, None, self.start - 1
        self.first_word: int | None = None  # the first word's frame less the initial padding
        if prefix is not None and frames:
            self.codes[:, :held] = c.audio_pad_id
            for k, delay in enumerate(self.delays):
                self.codes[k, delay : delay + frames] = prefix.codes[k]
            self._feed_prefix(prefix)

    def step(self) -> bool:
        """The next frame; False at the end: past the script (and its delays), or at the model's window
        (the reference runs max_context_steps frames after the prefix, but its RoPE ends there)."""
        c, ids, t = self.config, self.ids, self.t
        if t >= min(self.start + c.max_context_steps, c.max_context_steps) or (
            self.end is not None and t >= self.end
        ):
            return False
        self._read()
        frame = self.frame
        frame[:, 2:] = np.where(self.delays > t, c.audio_bos_id, self.codes[:, t])
        frame[1, :2] = ids.zero, ids.pad
        slot = t + self.shift
        self.backbone.grow(slot + 1, c.max_context_steps + self.shift)
        feeds = {"tokens": frame[:, None], "positions": np.full((2, 1), t), "slots": np.full((2, 1), slot)}
        hidden, action_logits, cb0_logits = self.backbone.run(
            feeds, ("hidden", "action_logits", "cb0_logits")
        )
        main, second = self.machine.process(
            t, self.state, sample(self._guide(action_logits), self.text, self.draw)
        )
        second = ids.pad if second == -1 else second
        if self.first_word is None and main == ids.new_word:
            self.first_word = t - self.initial_padding
        frame[:, 0], frame[:, 1] = main, second
        cb0 = mask_ids(self._guide(cb0_logits), (c.audio_pad_id, c.audio_bos_id))
        self.codes[0, t + 1] = code = sample(cb0, self.audio_sampling, self.draw)
        text = {"text": np.array([[main, second]] * 2)} if c.depformer_text_embedding else {}
        for s in range(c.depth):
            feeds = {"stage": np.array([s]), "previous": np.array([code, code]), "hidden": hidden} | text
            (logits,) = self.stages.run(feeds, ("logits",), self.stage_weights[s])
            self.codes[s + 1, t + 1] = code = sample(self._guide(logits), self.audio_sampling, self.draw)
        self.last, self.t = t, t + 1
        if self.end is None and self.state.end_step is not None:
            self.end = self.state.end_step + int(self.delays.max()) + MAX_PADDING
        return True

    @property
    def final_frames(self) -> int:
        """Frames whose codes are all known (every codebook's delayed column has been written)."""
        return max(0, min(self.last + 2, self.codes.shape[-1]) - int(self.delays.max()))

    def aligned(self, start: int, stop: int) -> np.ndarray:
        """The codes of frames start..stop-1, undelayed `[K, stop - start]`; ungenerated ones are pad."""
        columns = np.stack([self.codes[k, start + d : stop + d] for k, d in enumerate(self.delays)])
        return np.where(columns == UNGENERATED, self.config.audio_pad_id, columns)

    def _feed_prefix(self, prefix: PrefixPlan) -> None:
        """The prefix's frames through the backbone, the machine forced to its words' frames: each frame's
        audio is the clip's (BOS before a codebook's delay), its text what the machine gave the frame
        before. The frames are known in advance, so they run in calls of PREFILL_FRAMES."""
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
        self.backbone.grow(frames, c.max_context_steps + self.shift)
        for start in range(0, frames, PREFILL_FRAMES):
            chunk = rows[:, start : start + PREFILL_FRAMES]
            at = np.broadcast_to(np.arange(start, start + chunk.shape[1]), (2, chunk.shape[1]))
            self.backbone.run({"tokens": chunk, "positions": at, "slots": at}, ("hidden",))

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


class _Caches:
    """One graph's self-attention caches, bound as its `past_*` inputs and `present_*` outputs (updated
    in place); the backbone's grow by `CACHE_GROWTH` frames as the generation needs them."""

    def __init__(self, session: ort.InferenceSession, layers: int, shape: tuple[int, ...]) -> None:
        self.session, self.layers = session, layers
        self._hold([np.zeros(shape, np.float32) for _ in range(2 * layers)])

    def _hold(self, buffers: list[np.ndarray]) -> None:
        self.buffers = buffers
        self.values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]  # views, no copy

    def grow(self, needed: int, limit: int) -> None:
        slots = self.buffers[0].shape[2]
        if needed <= slots:
            return
        grown = []
        for buffer in self.buffers:
            bigger = np.zeros((*buffer.shape[:2], grown_capacity(needed, limit), buffer.shape[3]), np.float32)
            bigger[:, :, :slots] = buffer
            grown.append(bigger)
        self._hold(grown)

    def run(
        self,
        feeds: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        bound: Mapping[str, ort.OrtValue] | None = None,
    ) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=value.dtype))
        for name, value in (bound or {}).items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:  # first: the outputs come back in the order they are bound
            binding.bind_output(name)
        bind_caches(binding, self.values, self.layers)
        self.session.run_with_iobinding(binding)
        return [value.numpy() for value in binding.get_outputs()[: len(outputs)]]  # not the caches
