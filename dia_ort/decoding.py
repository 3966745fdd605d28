"""The decoding loop that every entry point runs: requests on one set of cache rows, stepped together.

`generate`, `generate_batch`, `generate_stream`, long-form and the server's scheduler all run
`Decoding`; a fixed batch is requests that all join before the first step, as vLLM's offline `LLM`
and its server share one engine. Requests that `join` together get one encoder run for all their
texts, then their first prefill chunks, one call for those of one length. Each `step`:
1. drops requests that were cancelled (their rows are freed);
2. decodes one row for every request whose known rows are all in: one step-graph call for all of
   them, each row at its own position (requests still prefilling are `held` in that call);
3. feeds each long prefill its next chunk (PREFILL_CHUNK rows), between the others' steps.
A request samples each row from its own generator (`ItemState.sample`) and hands out the audio that
row completed (`ItemStream`), so it gets the same tokens and audio alone as in any batch, up to the
floating-point rounding of the batched matrix products.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dia_ort.batching import HostRows
from dia_ort.engine import DeviceRows, Engine
from dia_ort.item import PAIR, ItemState, cfg_text_rows, prefill_chunks
from dia_ort.options import GenerationOptions
from dia_ort.streaming import AudioChunk, ItemStream

log = logging.getLogger(__name__)


class Rows(Protocol):
    """The owner of a batch's cache rows (batching.HostRows on the CPU, engine.DeviceRows on CUDA).

    A request holds a pair of rows from `add` to `remove`; `rows` are the rows a step feeds, each at
    its next position in `positions`; `close` frees the buffers when the batch ends.
    """

    rows: int
    positions: np.ndarray

    def add(self, text_ids: np.ndarray, text_mask: np.ndarray) -> int: ...

    def remove(self, first: int) -> int | None: ...

    def prefill(self, first: int, tokens: np.ndarray) -> np.ndarray: ...

    def step(self, tokens: np.ndarray, held: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def open_rows(engine: Engine, max_rows: int, slots: int, graph: bool = False) -> Rows:
    """Cache rows for a batch of `max_rows` rows of up to `slots` positions: host rows on the CPU, fixed
    device rows on CUDA or where `graph` asks for the fixed-buffer protocol (a CUDA graph)."""
    if graph or engine.device.kind == "cuda":
        return DeviceRows(engine, max_rows, slots, graph)
    return HostRows(engine, max_rows)


def encoded_rows(
    engine: Engine, text_ids: np.ndarray, text_mask: np.ndarray, slots: int, graph: bool = False
) -> Rows:
    """Cache rows for `[B, L]` text rows, encoded: for tools that drive the step themselves (`run_at`)."""
    rows = open_rows(engine, len(text_ids), slots, graph)
    rows.add(text_ids, text_mask)
    return rows


def run_at(rows: Rows, tokens: np.ndarray, start: int) -> np.ndarray:
    """Feed every row `[rows, S, C]` tokens at positions start..start+S-1, whatever it was fed before
    (the slots from `start` on are written again); return the last row's logits `[rows, C, V]`. For
    tools that replay positions: benchmarks, the quantization accuracy."""
    rows.positions[: rows.rows] = start
    return rows.prefill(0, tokens)


class Sink(Protocol):
    """Where a request's chunks go: `AudioChunk`s, then None at its end, or the exception that failed it."""

    def put(self, item: AudioChunk | Exception | None) -> None: ...


class ChunkedRequest:
    """What the scheduler and its callers see of a request of either family: its chunks (to a `Sink`,
    or a queue that iterating it reads), and cancelling it."""

    chunks: Sink
    cancelled: bool

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the next step; a no-op once the request has ended."""
        self.cancelled = True

    def __iter__(self) -> Iterator[np.ndarray]:
        """Its audio chunks as they come (with the default sink); raises what failed it."""
        while (chunk := self.chunks.get()) is not None:
            if isinstance(chunk, Exception):
                raise chunk
            if len(chunk.audio):
                yield chunk.audio


@dataclass(eq=False)
class Request(ChunkedRequest):
    """One text being decoded, from submission to its last audio chunk.

    Iterate it (from any thread) for its float32 audio chunks at its sample rate (with the default
    sink); `cancel()` frees its rows at the next step.
    """

    id: int
    text: np.ndarray  # byte ids [L]
    item: ItemState
    options: GenerationOptions
    audio: ItemStream | None  # None: codes only, no audio
    rng: np.random.Generator
    chunks: Sink = field(default_factory=queue.SimpleQueue)
    first_row: int | None = None  # its pair's first row in the batch, while running
    row: int = 0  # the decoder row it produced last
    tokens: np.ndarray | None = None  # that row, fed at the next step; None while its prefill runs
    prefilled: int = 0  # its known rows fed so far
    cancelled: bool = False
    done: bool = False

    @classmethod
    def new(
        cls,
        id: int,
        engine: Engine,
        text: np.ndarray,
        prompt: np.ndarray | None,
        options: GenerationOptions,
        audio: ItemStream | None = None,
    ) -> Request:
        """A request for byte ids `text` and checked prompt codes, sampling from a generator of its own."""
        item = ItemState(engine.config, prompt, options.max_new_tokens, engine.frame_rate)
        return cls(id, text, item, options, audio, np.random.default_rng(options.seed))

    def codes(self) -> np.ndarray:
        """Its `[T, C]` audio codes (once it is done)."""
        return self.item.codes()


class Decoding:
    """Requests decoded together on `rows`: `join` them, then `step` until `running` is empty."""

    def __init__(self, rows: Rows, num_channels: int) -> None:
        self.rows = rows
        self.num_channels = num_channels
        self.running: list[Request] = []
        self.steps = 0  # step-graph calls that decoded a row

    def step(self) -> None:
        """Drop cancelled requests, decode one row of every running request, feed long prefills a chunk."""
        for request in [r for r in self.running if r.cancelled]:
            self.retire(request)
        self._decode()
        for request in [r for r in self.running if r.tokens is None]:  # one chunk of each long prefill
            self._prefill_chunk(request)

    def join(self, requests: list[Request]) -> None:
        """Admit `requests`: one encoder run for all their texts, then their first prefill chunks, one
        call for those of one length (requests without a voice prompt all have one known row).

        An admission that fails raises, with the rows it took freed and none of `requests` running.
        """
        requests = sorted(requests, key=_first_chunk)
        text_ids, text_mask = cfg_text_rows([r.text for r in requests])
        first = self.rows.add(text_ids, text_mask)
        for index, request in enumerate(requests):
            request.first_row = first + PAIR * index
            self.running.append(request)
        try:
            logits = []
            for rows, same in itertools.groupby(requests, key=_first_chunk):
                same = list(same)
                known = np.concatenate([np.repeat(r.item.rows[None, :rows], PAIR, axis=0) for r in same])
                together = self.rows.prefill(same[0].first_row, known)
                for index, request in enumerate(same):
                    request.prefilled = rows
                    logits.append(together[PAIR * index : PAIR * (index + 1)])
        except Exception:
            for request in requests:
                self._leave(request)
            raise
        for request, pair in zip(requests, logits, strict=True):  # admitted: each fails alone from here
            try:
                self._prefilled(request, pair)
            except Exception as exc:
                self._leave(request)
                self.fail(request, exc)

    def retire(self, request: Request) -> None:
        """Free the request's rows and end its chunks."""
        self._leave(request)
        request.chunks.put(None)

    def fail(self, request: Request, exc: Exception) -> None:
        """End a request that is not running (any more) with `exc`."""
        log.error("request %d failed: %r", request.id, exc)
        request.chunks.put(exc)
        request.chunks.put(None)

    # -- the loop's parts ---------------------------------------------------------------------------

    def _decode(self) -> None:
        """One step-graph call: every request with a row to feed decodes its next row."""
        if not any(r.tokens is not None for r in self.running):
            return
        tokens = np.zeros((self.rows.rows, 1, self.num_channels), dtype=np.int64)
        held = np.ones(self.rows.rows, dtype=bool)  # rows of no request, or of one still prefilling
        fed = [(r, r.first_row) for r in self.running if r.tokens is not None]
        for request, first in fed:
            tokens[first : first + PAIR, 0] = request.tokens
            held[first : first + PAIR] = False
        logits = self.rows.step(tokens, held)
        self.steps += 1
        for request, first in fed:  # rows as they were in this step: one that leaves moves another
            self._produce(request, logits[first : first + PAIR])

    def _prefill_chunk(self, request: Request) -> None:
        """Feed the next chunk of a long prefill; a request whose chunk fails ends with the error."""
        start, end = next(c for c in prefill_chunks(request.item.prefill) if c[0] == request.prefilled)
        known = np.repeat(request.item.rows[None, start:end], PAIR, axis=0)
        try:
            logits = self.rows.prefill(request.first_row, known)
        except Exception as exc:
            self._leave(request)
            self.fail(request, exc)
            return
        request.prefilled = end
        self._prefilled(request, logits)

    def _prefilled(self, request: Request, logits: np.ndarray) -> None:
        """After a prefill chunk: once every known row is in, sample the request's first row."""
        if request.prefilled == request.item.prefill:
            request.row = request.item.prefill - 1
            self._produce(request, logits)

    def _produce(self, request: Request, logits: np.ndarray) -> None:
        """Sample the request's next row from its pair's `[2, C, V]` logits; hand out finished audio."""
        item, row = request.item, request.row + 1
        request.tokens, request.row = item.sample(row, logits, request.options, request.rng), row
        last = item.finished(row)
        if request.audio is not None and not request.audio.ended:
            audio = request.audio.after_row(item, row)
            if audio is not None:
                request.chunks.put(AudioChunk(request.id, audio, request.audio.ended))
        if last:
            request.done = True
            self.retire(request)

    def _leave(self, request: Request) -> None:
        """Free the request's pair of rows (the rows' owner may move the last pair into them)."""
        if request not in self.running:
            return
        moved = self.rows.remove(request.first_row)
        if moved is not None:
            mover = next(r for r in self.running if r.first_row == moved)
            mover.first_row = request.first_row
        self.running.remove(request)
        request.first_row = None


def _first_chunk(request: Request) -> int:
    """How many known rows the request's first prefill chunk feeds."""
    return prefill_chunks(request.item.prefill)[0][1]
