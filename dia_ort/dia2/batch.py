"""Dia2 generations stepped together: one backbone call and one call per depformer stage a frame.

Every entry point runs its frames here: `Dia2.stream` a batch of one, the server's scheduler as many
generations as it admits (continuous batching, as `dia_ort.decoding` does for Dia). Each generation
is a CFG pair of rows (conditional, unconditional) with its own position and cache slot, which the
backbone graph takes per row; every generation runs the depformer's stages in the same order, so a
stage's call feeds all of them on that stage's kernels. A generation samples from its own rows only,
with its own draws, so it makes the same codes alone as in any batch, up to the floating-point
rounding of the batched matrix products.

The caches live in host buffers with room for `max_rows` rows, and the active ones are always the
first rows of them (one that leaves has the last pair moved into its place), so a call binds
contiguous views and nothing is copied per frame. The backbone's caches grow (`grown_capacity`)
as the furthest generation needs them.

A generation with a prefix (a voice) feeds its frames PREFILL_FRAMES at a time: the first chunk when
it joins, then one chunk after each frame of the others, as vLLM's chunked prefill does, so a long
voice holds the running generations one chunk at a time (each voice still feeding adds its chunk). Its rows ride along in the frames
meanwhile, fed the next prefix frame at its own slot, which the next chunk writes again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from dia_ort.dia2.frames import FrameLoop
from dia_ort.dia2.stage_weights import StageWeights
from dia_ort.dia2_config import Dia2Config
from dia_ort.engine import bind_caches, grown_capacity

PAIR = 2  # a generation's rows: conditional and unconditional
PREFILL_FRAMES = 16  # prefix frames per backbone call: a joining prefix holds the others' frames this long


@dataclass(frozen=True)
class DecoderGraphs:
    """What a frame runs: the backbone step, the depformer stage and each stage's kernels."""

    backbone: ort.InferenceSession
    depformer: ort.InferenceSession
    stage_weights: StageWeights


class FrameRows:
    """The backbone's and the depformer's caches of up to `max_rows` rows, the first `rows` in use."""

    def __init__(self, config: Dia2Config, graphs: DecoderGraphs, max_rows: int) -> None:
        if max_rows < PAIR or max_rows % PAIR:
            raise ValueError(f"max_rows must be a positive multiple of {PAIR}, got {max_rows}")
        self.config, self.graphs, self.max_rows = config, graphs, max_rows
        d, p = config.decoder, config.depformer
        self.limit = config.max_context_steps + 1  # slots: a prefix moves every frame one slot on
        self.backbone = [
            np.zeros((max_rows, d.kv_heads, 0, d.head_dim), np.float32) for _ in range(2 * d.layers)
        ]
        self.stages = [
            np.zeros((max_rows, p.heads, max(config.depth, 1), p.head_dim), np.float32)
            for _ in range(2 * p.layers)
        ]
        self.rows = 0

    def add(self) -> int:
        """Take the next pair of rows; return the first."""
        if self.rows + PAIR > self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows // PAIR} generations)")
        self.rows += PAIR
        return self.rows - PAIR

    def remove(self, first: int) -> int | None:
        """Free the pair at `first`; the last pair moves into it: return where it was (None if none)."""
        last = self.rows - PAIR
        if first != last:
            for buffer in (*self.backbone, *self.stages):
                buffer[first : first + PAIR] = buffer[last : last + PAIR]
        self.rows = last
        return last if first != last else None

    def grow(self, slots: int) -> None:
        """Room for `slots` cache slots in every row's backbone caches."""
        have = self.backbone[0].shape[2]
        if slots <= have:
            return
        wider = grown_capacity(slots, self.limit)
        for index, buffer in enumerate(self.backbone):
            grown = np.zeros((*buffer.shape[:2], wider, buffer.shape[3]), np.float32)
            grown[:, :, :have] = buffer
            self.backbone[index] = grown

    def run_backbone(
        self, first: int, end: int, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray
    ) -> list[np.ndarray]:
        """Rows first..end-1 take `[rows, S, channels]` tokens at their positions and slots: their hidden
        states, action and codebook-0 logits."""
        feeds = {"tokens": tokens, "positions": positions, "slots": slots}
        outputs = ("hidden", "action_logits", "cb0_logits")
        caches = [buffer[first:end] for buffer in self.backbone]
        return _run(self.graphs.backbone, feeds, outputs, caches, self.config.decoder.layers)

    def run_stage(
        self, stage: int, previous: np.ndarray, hidden: np.ndarray, text: np.ndarray | None
    ) -> np.ndarray:
        """Depformer stage `stage` on every row in use, on that stage's kernels: its logits."""
        feeds = {"stage": np.array([stage]), "previous": previous, "hidden": hidden}
        if text is not None:
            feeds["text"] = text
        caches = [buffer[: self.rows] for buffer in self.stages]
        layers = self.config.depformer.layers
        (logits,) = _run(
            self.graphs.depformer, feeds, ("logits",), caches, layers, self.graphs.stage_weights[stage]
        )
        return logits


class FrameBatch:
    """Generations (`FrameLoop`s) on one set of rows: `join` them, `step` until `loops` is empty."""

    def __init__(self, config: Dia2Config, graphs: DecoderGraphs, max_generations: int = 1) -> None:
        self.config = config
        self.rows = FrameRows(config, graphs, PAIR * max_generations)
        self.loops: list[FrameLoop] = []  # loop i holds rows 2i and 2i + 1
        self.held: dict[FrameLoop, int] = {}  # generations still feeding their prefix -> frames fed
        self.failed: dict[FrameLoop, Exception] = {}  # generations whose prefix failed at the last step
        self.frames = 0  # frames run

    def join(self, loop: FrameLoop) -> None:
        """Admit a generation: its pair of rows, and its prefix's first chunk. A chunk that fails leaves
        the batch as it was, and raises."""
        self.rows.add()
        self.loops.append(loop)
        if loop.prefill is not None:
            self.held[loop] = 0
            try:
                self._feed_chunk(loop)
            except Exception:
                self.leave(loop)
                raise

    def leave(self, loop: FrameLoop) -> None:
        """Free a generation's rows (the last generation's move into them)."""
        index = self.loops.index(loop)
        if self.rows.remove(PAIR * index) is not None:
            self.loops[index] = self.loops[-1]
        self.loops.pop()
        self.held.pop(loop, None)

    def step(self) -> list[FrameLoop]:
        """One frame of every generation whose prefix is in, then the next prefix chunk of the others;
        those that ended before the frame leave, and are returned. A generation whose chunk fails
        leaves too, with its error in `failed`."""
        ended = [loop for loop in self.loops if loop not in self.held and not loop.begin()]
        for loop in ended:
            self.leave(loop)
        if len(self.held) < len(self.loops):
            self._frame()
            self.frames += 1
        self.failed = {}
        for loop in list(self.held):
            try:
                self._feed_chunk(loop)
            except Exception as exc:
                self.leave(loop)
                self.failed[loop] = exc
        return ended

    def _frame(self) -> None:
        loops, held = self.loops, self.held
        tokens = np.stack([loop.prefill[:, held[loop]] if loop in held else loop.frame for loop in loops])
        positions = np.repeat([held.get(loop, loop.t) for loop in loops], PAIR)[:, None]
        slots = np.repeat([held.get(loop, loop.slot) for loop in loops], PAIR)[:, None]
        self.rows.grow(int(slots.max()) + 1)
        hidden, action_logits, cb0_logits = self.rows.run_backbone(
            0, self.rows.rows, tokens.reshape(PAIR * len(loops), 1, -1), positions, slots
        )
        running = [
            (loop, slice(PAIR * i, PAIR * (i + 1))) for i, loop in enumerate(loops) if loop not in held
        ]
        for loop, rows in running:
            loop.take_backbone(action_logits[rows], cb0_logits[rows])
        text = (
            np.concatenate([loop.text_tokens for loop in loops])
            if self.config.depformer_text_embedding
            else None
        )
        for stage in range(self.config.depth):
            previous = np.repeat([loop.code for loop in loops], PAIR)
            logits = self.rows.run_stage(stage, previous, hidden, text)
            for loop, rows in running:
                loop.take_stage(stage, logits[rows])
        for loop, _ in running:
            loop.end_frame()

    def _feed_chunk(self, loop: FrameLoop) -> None:
        """The next PREFILL_FRAMES frames of a generation's prefix, on its own rows."""
        assert loop.prefill is not None
        start, first = self.held[loop], PAIR * self.loops.index(loop)
        chunk = loop.prefill[:, start : start + PREFILL_FRAMES]
        end = start + chunk.shape[1]
        self.rows.grow(end)
        at = np.broadcast_to(np.arange(start, end), (PAIR, chunk.shape[1]))
        self.rows.run_backbone(first, first + PAIR, chunk, at, at)
        if end == loop.prefill.shape[1]:
            del self.held[loop]
        else:
            self.held[loop] = end


def _run(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    outputs: tuple[str, ...],
    caches: list[np.ndarray],
    layers: int,
    bound: Mapping[str, ort.OrtValue] | None = None,
) -> list[np.ndarray]:
    """Run a graph with its caches (contiguous views of the host buffers) bound as `past_*` inputs and
    `present_*` outputs, updated in place; return `outputs`."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=value.dtype))
    for name, value in (bound or {}).items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:  # first: the outputs come back in the order they are bound
        binding.bind_output(name)
    bind_caches(binding, [ort.OrtValue.ortvalue_from_numpy(cache) for cache in caches], layers)
    session.run_with_iobinding(binding)
    return [value.numpy() for value in binding.get_outputs()[: len(outputs)]]  # not the caches
