"""A fixed batch: requests that all join the decoding loop (decoding.py) at once and step until each
has ended. `Dia.generate`, `generate_batch`, `generate_stream` and each long-form part run one
(docs/generation.md section 8).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dia_ort.audio import DAC_SAMPLE_RATE
from dia_ort.codec import Codec
from dia_ort.decoding import Decoding, Request, open_rows
from dia_ort.engine import Engine
from dia_ort.item import PAIR, ItemState, prefill_chunks
from dia_ort.options import GenerationOptions
from dia_ort.streaming import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, AudioChunk, ItemStream


@dataclass(frozen=True)
class Step:
    """One step of a generation: number `index` (from 1) of at most `total`."""

    index: int
    total: int


class Collected(list):
    """A request's sink in a fixed batch: what the loop handed out since it was last emptied."""

    def put(self, item: AudioChunk | Exception | None) -> None:
        self.append(item)


class Generation:
    """One batched request. Iterate it for `Step`s (or `stream` it for audio too); afterwards `codes()`
    gives each item's frames.

    Each item is a request of the decoding loop, with its own generator from the seed, so an item
    samples the tokens it would sample alone.
    """

    def __init__(
        self,
        engine: Engine,
        texts: list[np.ndarray],
        prompts: list[np.ndarray | None],
        options: GenerationOptions,
        cuda_graph: bool = False,
    ) -> None:
        self.cuda_graph = cuda_graph  # run one-row steps on fixed buffers as a CUDA graph (engine.py)
        self.engine, self.options = engine, options
        self.requests = [
            Request.new(i, engine, text, prompt, options)
            for i, (text, prompt) in enumerate(zip(texts, prompts, strict=True))
        ]
        for request in self.requests:
            request.chunks = Collected()

    @property
    def items(self) -> list[ItemState]:
        return [r.item for r in self.requests]

    def __iter__(self) -> Iterator[Step]:
        slots = max(item.slots for item in self.items)
        rows = open_rows(self.engine, PAIR * len(self.requests), slots, graph=self.cuda_graph)
        decoding = Decoding(rows, self.engine.config.num_channels)
        # an item takes a step per prefill chunk after its first, and one per row it produces
        total = max(
            len(prefill_chunks(item.prefill)) + item.last_row + item.config.max_delay - item.prefill
            for item in self.items
        )
        try:
            decoding.join(self.requests)
            for index in itertools.count(1):
                if index > 1:
                    decoding.step()
                self._raise_failure()
                yield Step(index, total)
                if not decoding.running:
                    return
        finally:
            rows.close()

    def stream(
        self,
        codec: Codec,
        sample_rate: int = DAC_SAMPLE_RATE,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> Iterator[Step | AudioChunk]:
        """Run the generation, yielding each `Step` and, after it, the `AudioChunk`s it completed.

        Every item ends with one chunk marked `last` (empty when its audio ended on the step before);
        the others are never empty.
        """
        for request in self.requests:
            request.audio = ItemStream(codec, sample_rate, first_chunk_frames, chunk_frames)
        for step in self:
            yield step
            for request in self.requests:
                chunks = [c for c in request.chunks if isinstance(c, AudioChunk)]
                request.chunks.clear()
                yield from chunks

    def codes(self) -> list[np.ndarray]:
        """Each item's `[T, C]` audio codes after its prompt, delay undone (after iterating)."""
        return [item.codes() for item in self.items]

    def _raise_failure(self) -> None:
        """Raise what failed a request of the batch, if one failed."""
        for request in self.requests:
            failure = next((c for c in request.chunks if isinstance(c, Exception)), None)
            if failure is not None:
                raise failure
