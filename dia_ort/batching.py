"""Cache rows in host memory for a batch whose requests change between steps: what the CPU runs on.

Each request is a CFG pair of rows. The rows live in host buffers with room for `max_rows`, and the
active ones are always the first `rows` of them, so a step binds contiguous views of the buffers and
nothing is copied per step (each cache buffer is the step's `past_*` input and `present_*` output).
Requests that join at one step take the next pairs of rows, with one encoder run for all their texts
and one prefill for those whose known rows are as many; one that leaves has the last pair moved into
its place. Every row has positions of its own,
which the step graph takes per batch row. The caches grow (`grown_capacity`) as positions advance, and
the cross-attention buffers widen to the longest text in the batch.

A pair's unconditional row is all text ids 0 under its text's mask (`item.cfg_text_rows`), so its
encoding depends on the text's length alone. ONNX Runtime's CPU kernels give the float32 encoder's row
the same bits whatever rows share its run and however far it is padded (tested; an encoder with an op
across rows, such as a per-tensor dynamic quantization, would not). So each length's unconditional
row is encoded once and kept on the engine (`Engine.unconditional_rows`, the lengths used last, up to
a byte budget): a request of a length seen before runs the encoder on its text row alone, half the
work (full shape, 96 text bytes: 255 ms against 476).

The buffers are host memory, which is what the CPU provider reads; on CUDA each step would copy them
to the device, so CUDA runs fixed batches on `engine.DeviceRows`, and continuous batching is for the
CPU for now.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from dia_ort.engine import TENSOR_TYPES, Engine, bind_caches, check_window, encode_rows, grown_capacity
from dia_ort.item import PAIR
from dia_ort.manifest import cross_names


def unconditional_length(ids: np.ndarray, mask: np.ndarray) -> int | None:
    """A text row's length if it is an unconditional row (every id 0, the mask its first positions),
    else None."""
    length = int(mask.sum())
    return None if ids.any() or not mask[:length].all() else length


class HostRows:
    """The caches, cross-attention K/V and text masks of up to `max_rows` rows of one engine."""

    def __init__(self, engine: Engine, max_rows: int) -> None:
        if max_rows < PAIR or max_rows % PAIR:
            raise ValueError(f"max_rows must be a positive multiple of {PAIR}, got {max_rows}")
        config = engine.config
        self.engine, self.config, self.max_rows = engine, config, max_rows
        self.rows = 0
        self.capacity = 0  # cache slots
        self.text_length = 0  # cross-attention keys
        self.positions = np.zeros(max_rows, dtype=np.int64)  # the next position of each row
        self.caches: list[np.ndarray] = []
        self.cross: list[np.ndarray] = []
        self.mask = np.zeros((max_rows, 0), dtype=bool)
        self._grow_caches(grown_capacity(1, config.audio_length))
        self._widen_text(1)

    # -- joining and leaving ------------------------------------------------------------------------

    def add(self, text_ids: np.ndarray, text_mask: np.ndarray) -> int:
        """Encode requests' `[2k, L]` text rows (k pairs, one encoder run) into the next free rows;
        return the first of them."""
        count = text_ids.shape[0]
        if count % PAIR or self.rows + count > self.max_rows:
            raise ValueError(f"{count} rows do not fit the batch ({self.rows} of {self.max_rows} rows taken)")
        length = text_ids.shape[1]
        if length > self.text_length:
            self._widen_text(length)
        first, end = self.rows, self.rows + count
        for buffer in self.cross:
            buffer[first:end] = 0
        self._encode(first, text_ids, text_mask)
        for cache in self.caches:  # a masked slot still enters the sum with weight 0: no NaN may stay
            cache[first:end] = 0
        self.mask[first:end] = False
        self.mask[first:end, :length] = text_mask
        self.positions[first:end] = 0
        self.rows = end
        return first

    def _encode(self, first: int, text_ids: np.ndarray, text_mask: np.ndarray) -> None:
        """Write the cross-attention K/V of text rows into the buffers from row `first` on: each
        unconditional row as kept for its length where one was, the others in one encoder run (one row
        for each new length, which is kept)."""
        kept = self.engine.unconditional_rows
        lengths = [unconditional_length(ids, mask) for ids, mask in zip(text_ids, text_mask, strict=True)]
        found: dict[int, list[np.ndarray]] = {}  # the unconditional rows' K/V by length
        new: set[int] = set()  # lengths not kept: the encoder runs one row of each
        run: list[int] = []  # the rows the encoder runs
        for row, length in enumerate(lengths):
            if length is None:
                run.append(row)
            elif length not in found and length not in new:
                rows = kept.get(length)
                if rows is None:
                    new.add(length)
                    run.append(row)
                else:
                    found[length] = rows
        encoded = (
            [v.numpy() for v in encode_rows(self.engine, text_ids[run], text_mask[run], None)] if run else []
        )
        for i, row in enumerate(run):
            for buffer, value in zip(self.cross, encoded, strict=True):
                buffer[first + row, :, : value.shape[2]] = value[i]
            if (length := lengths[row]) is not None:
                found[length] = [value[i : i + 1, :, :length].copy() for value in encoded]
                for value in found[length]:
                    value.setflags(write=False)  # every batch of this engine reads it
                kept.put(length, found[length])
        ran = set(run)
        for row, length in enumerate(lengths):
            if length is not None and row not in ran:
                for buffer, value in zip(self.cross, found[length], strict=True):
                    buffer[first + row, :, :length] = value[0]

    def remove(self, first: int) -> int | None:
        """Free the pair at `first`; the last pair moves into it. Returns where that pair was, or None."""
        last = self.rows - PAIR
        moved = None
        if first != last:
            for buffer in (*self.caches, *self.cross, self.mask, self.positions):
                buffer[first : first + PAIR] = buffer[last : last + PAIR]
            moved = last
        self.rows -= PAIR
        if self.rows == 0:  # an empty batch starts small again
            self._grow_caches(grown_capacity(1, self.config.audio_length))
            self._widen_text(1)
        return moved

    # -- running ------------------------------------------------------------------------------------

    def prefill(self, first: int, tokens: np.ndarray) -> np.ndarray:
        """Feed rows from `first` their next `[R, S, C]` known rows (one step-graph call for all of
        them, each row from its own position); return their logits `[R, C, V]`."""
        count, rows = tokens.shape[:2]
        start = self.positions[first : first + count, None]
        self._ensure_slots(int(start.max()) + rows)
        logits = self._run(first, first + count, tokens, start + np.arange(rows, dtype=np.int64))
        self.positions[first : first + count] += rows
        return logits

    def close(self) -> None:
        """The batch has ended: hand its buffers back."""
        self.rows = 0
        self.caches, self.cross = [], []

    def step(self, tokens: np.ndarray, held: np.ndarray | None = None) -> np.ndarray:
        """Feed every active row one `[rows, 1, C]` token row at its own position; return `[rows, C, V]`.

        Rows that are `held` (a bool per active row: their prefill is still under way) stay at their
        position: what this step writes at it is overwritten by their next prefill chunk, which starts
        there, before anything reads it.
        """
        if tokens.shape[0] != self.rows:
            raise ValueError(f"{self.rows} rows are active, got tokens for {tokens.shape[0]}")
        positions = self.positions[: self.rows, None].copy()
        self._ensure_slots(int(positions.max()) + 1)
        logits = self._run(0, self.rows, tokens, positions)
        self.positions[: self.rows] += 1 if held is None else ~held
        return logits

    def _run(self, lo: int, hi: int, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step-graph call on rows lo:hi, bound as views of the buffers."""
        engine = self.engine
        binding = engine.step.io_binding()
        binding.bind_output("logits", "cpu")
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("positions", positions)
        binding.bind_cpu_input("text_mask", self.mask[lo:hi])
        _, cross_element = TENSOR_TYPES[engine.cross_type]
        for name, buffer in zip(cross_names(self.config.decoder_layers), self.cross, strict=True):
            binding.bind_ortvalue_input(
                name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buffer[lo:hi], cross_element)
            )
        _, cache_element = TENSOR_TYPES[engine.cache_type]
        views = [
            ort.OrtValue.ortvalue_from_numpy_with_onnx_type(c[lo:hi], cache_element) for c in self.caches
        ]
        bind_caches(binding, views, self.config.decoder_layers)
        engine.step.run_with_iobinding(binding)
        return np.array(binding.get_outputs()[0].numpy())

    # -- buffers ------------------------------------------------------------------------------------

    def _ensure_slots(self, slots: int) -> None:
        check_window(self.config, slots)
        if slots > self.capacity:
            self._grow_caches(grown_capacity(slots, self.config.audio_length))

    def _grow_caches(self, capacity: int) -> None:
        """Cache buffers of `capacity` slots, keeping the active rows' slots written so far."""
        config = self.config
        shape = (self.max_rows, config.kv_heads, capacity, config.head_dim)
        self.caches = self._resized(self.caches, shape, self.engine.cache_type)
        self.capacity = capacity

    def _widen_text(self, length: int) -> None:
        """Cross-attention buffers for `length` text positions, keeping the active rows' keys."""
        config = self.config
        shape = (self.max_rows, config.cross_heads, length, config.cross_head_dim)
        self.cross = self._resized(self.cross, shape, self.engine.cross_type)
        keep = min(length, self.text_length)
        mask = np.zeros((self.max_rows, length), dtype=bool)
        mask[: self.rows, :keep] = self.mask[: self.rows, :keep]
        self.mask, self.text_length = mask, length

    def _resized(self, old: list[np.ndarray], shape: tuple[int, ...], tensor_type: str) -> list[np.ndarray]:
        """One zeroed buffer per layer's key and value of `shape`, holding the active rows of `old` along
        axis 2 (slots or text positions) as far as both reach."""
        storage, _ = TENSOR_TYPES[tensor_type]
        fresh = [np.zeros(shape, dtype=storage) for _ in range(2 * self.config.decoder_layers)]
        for before, after in zip(old, fresh, strict=False):  # none on the first call
            keep = min(before.shape[2], shape[2])
            after[: self.rows, :, :keep] = before[: self.rows, :, :keep]
        return fresh
