"""Continuous batching: many requests share one engine, each joining the running batch at the next step.

A small state machine in the spirit of vLLM's scheduler: `waiting` (a bounded FIFO) and `running`
(at most `max_batch` requests). Each `step()` drops cancelled requests, admits waiting ones (their
encoder run and prefill), runs one decoder step for every running request at its own position, and
hands out the audio that step completed. A finished or cancelled request leaves at the next step and
frees its rows. Sampling, EOS handling and streaming are `Dia.generate`'s own (`ItemState`,
`next_tokens`, `ItemStream`), and every request has its own random generator, so a request gets the
tokens it would get alone, up to floating-point rounding of the batched matrix products.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dia_ort.batching import PAIR, BatchDecoder
from dia_ort.generation import ItemState, cfg_text_rows, prefill_chunks
from dia_ort.options import GenerationOptions
from dia_ort.streaming import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, AudioChunk, ItemStream, check_chunk_frames
from dia_ort.text import encode_text

if TYPE_CHECKING:
    from dia_ort.model import AudioPrompt, Dia

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; try again later."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed (the server is stopping): it takes no more requests."""


class Sink(Protocol):
    """Where a request's chunks go: `AudioChunk`s, then None at its end, or the exception that failed it."""

    def put(self, item: AudioChunk | Exception | None) -> None: ...


@dataclass(eq=False)
class Request:
    """One text in the continuous batch, from submission to its last audio chunk.

    Iterate it (from any thread) for its float32 audio chunks at its sample rate; `cancel()` frees its
    rows at the next step.
    """

    id: int
    text: np.ndarray  # byte ids [L]
    item: ItemState
    options: GenerationOptions
    audio: ItemStream
    rng: np.random.Generator
    chunks: Sink = field(default_factory=queue.SimpleQueue)
    first_row: int | None = None  # its pair's first row in the batch, while running
    row: int = 0  # the decoder row it produced last
    tokens: np.ndarray | None = None  # that row, fed at the next step; None while its prefill runs
    prefilled: int = 0  # its known rows fed so far
    cancelled: bool = False
    done: bool = False

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

    def codes(self) -> np.ndarray:
        """Its `[T, C]` audio codes (once it is done)."""
        return self.item.codes()


class Scheduler:
    """Runs requests on one `Dia`'s engine with continuous batching, in a thread of its own or by `step()`."""

    def __init__(
        self,
        dia: Dia,
        max_batch: int = 8,
        max_queue: int = 32,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_chunk_frames(first_chunk_frames, chunk_frames)
        self.dia, self.config = dia, dia.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.chunking = (first_chunk_frames, chunk_frames)
        self.batch = BatchDecoder(dia.engine, PAIR * max_batch)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.ids = itertools.count(1)
        self.work = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.steps = 0  # decoder steps run, for metrics
        self.step_times: deque[float] = deque(maxlen=64)  # when the last steps ended

    # -- the caller's side --------------------------------------------------------------------------

    def submit(
        self, text: str, audio_prompt: AudioPrompt | None = None, sink: Sink | None = None, **options: Any
    ) -> Request:
        """Queue a request (checked here, in the caller's thread); raises QueueFull at the bound.

        Its chunks go to `sink` (for example an asyncio queue fed thread-safely), else to a queue that
        iterating the request reads.
        """
        opts = GenerationOptions(**options).validate()
        ids = encode_text(text, self.config.text_length)
        prompt = None if audio_prompt is None else self.dia.prompt_codes(audio_prompt)
        request = Request(
            id=next(self.ids),
            text=ids,
            item=ItemState(self.config, prompt, opts.max_new_tokens, self.dia.engine.frame_rate),
            options=opts,
            audio=ItemStream(self.dia.codec, opts.sample_rate, *self.chunking),
            rng=np.random.default_rng(opts.seed),
        )
        if sink is not None:
            request.chunks = sink
        with self.work:
            if self.closed:
                raise SchedulerClosed("the scheduler is closed")
            # requests that free rows will take at the next step are not queued beyond the batch: a burst
            # that arrives during one step fills the batch first (Ray's proxy counts on it)
            free_rows = self.max_batch - len(self.running)
            if len(self.waiting) >= self.max_queue + free_rows:
                raise QueueFull(
                    f"the batch is full and {len(self.waiting) - free_rows} requests are waiting "
                    "(the most this server queues)"
                )
            self.waiting.append(request)
            self.work.notify()
        return request

    def start(self) -> Scheduler:
        """Run `step()` in a background thread whenever there is work."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="dia-ort-scheduler", daemon=True)
            self.thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; requests still waiting or running end with an error."""
        with self.work:
            self.closed = True
            self.work.notify()
        if self.thread is not None:
            self.thread.join()
        for request in (*self.waiting, *self.running):
            request.chunks.put(RuntimeError("the scheduler was closed before the request finished"))
        self.waiting.clear()
        self.running.clear()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for rows."""
        return len(self.waiting)

    @property
    def occupancy(self) -> int:
        """Requests in the running batch."""
        return len(self.running)

    @property
    def alive(self) -> bool:
        """Whether the background thread is serving."""
        return self.thread is not None and self.thread.is_alive() and not self.closed

    @property
    def steps_per_second(self) -> float:
        """Decoder steps per second over the last steps (0 when idle for a second)."""
        times = self.step_times
        if len(times) < 2 or time.perf_counter() - times[-1] > 1.0:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    # -- the scheduler's side -----------------------------------------------------------------------

    def step(self) -> bool:
        """Drop cancelled requests, admit waiting ones, run one decoder step; False when idle.

        Called by the background thread once `start()` ran; call it directly only without one.
        """
        with self.work:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                request.chunks.put(None)
            admitted = []
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        for request in [r for r in self.running if r.cancelled]:
            self._retire(request)
        for request in [r for r in self.running if r.tokens is None]:  # one chunk of each long prefill
            self._prefill_chunk(request)
        if admitted:
            self._join(sorted(admitted, key=self._first_chunk))
        if self.running:
            tokens = np.zeros((self.batch.rows, 1, self.config.num_channels), dtype=np.int64)
            held = np.zeros(self.batch.rows, dtype=bool)
            for request in self.running:
                rows = slice(request.first_row, request.first_row + PAIR)
                if request.tokens is None:
                    held[rows] = True
                else:
                    tokens[rows, 0] = request.tokens
            logits = self.batch.step(tokens, held)
            self.steps += 1
            self.step_times.append(time.perf_counter())
            # rows as they were in this step: a request that leaves moves another into its rows
            for request, first in [(r, r.first_row) for r in self.running if not held[r.first_row]]:
                self._produce(request, logits[first : first + PAIR])
        return bool(self.running or self.waiting)

    @staticmethod
    def _first_chunk(request: Request) -> int:
        """How many known rows the request's first prefill chunk feeds."""
        return prefill_chunks(request.item.prefill)[0][1]

    def _join(self, requests: list[Request]) -> None:
        """Admit `requests` (ordered by `_first_chunk`) together; where that fails, each on its own, so
        a request that cannot join fails alone and the batch goes on without it."""
        try:
            logits = self._admit(requests)
        except Exception as exc:
            for request in requests:
                if request in self.running:
                    self._leave(request)
            if len(requests) == 1:
                self._fail(requests[0], exc)
            else:
                log.warning(
                    "admitting %d requests together failed (%r); admitting each alone", len(requests), exc
                )
                for request in requests:
                    self._join([request])
            return
        for request, pair in zip(requests, logits, strict=True):
            self._prefilled(request, pair)

    def _admit(self, requests: list[Request]) -> list[np.ndarray]:
        """Take rows for `requests`: one encoder run for all their texts, then their first prefill chunks,
        one call for those of one length (a server's requests without a voice prompt all have one
        known row). Returns each request's `[2, C, V]` logits."""
        text_ids, text_mask = cfg_text_rows([r.text for r in requests])
        first = self.batch.add(text_ids, text_mask)
        for index, request in enumerate(requests):
            request.first_row = first + PAIR * index
            self.running.append(request)
        logits = []
        for rows, same in itertools.groupby(requests, key=self._first_chunk):
            same = list(same)
            known = np.concatenate([np.repeat(r.item.rows[None, :rows], PAIR, axis=0) for r in same])
            together = self.batch.prefill(same[0].first_row, known)
            for index, request in enumerate(same):
                request.prefilled = rows
                logits.append(together[PAIR * index : PAIR * (index + 1)])
        return logits

    def _prefill_chunk(self, request: Request) -> None:
        """Feed the next chunk of a long prefill (one per step, between the others' steps)."""
        start, end = next(c for c in prefill_chunks(request.item.prefill) if c[0] == request.prefilled)
        known = np.repeat(request.item.rows[None, start:end], PAIR, axis=0)
        try:
            logits = self.batch.prefill(request.first_row, known)
        except Exception as exc:
            self._leave(request)
            self._fail(request, exc)
            return
        request.prefilled = end
        self._prefilled(request, logits)

    def _prefilled(self, request: Request, logits: np.ndarray) -> None:
        """After a prefill chunk: once every known row is in, sample the request's first row."""
        if request.prefilled == request.item.prefill:
            request.row = request.item.prefill - 1
            self._produce(request, logits)

    def _fail(self, request: Request, exc: Exception) -> None:
        """End a request that left the batch (or never joined it) with `exc`."""
        log.error("request %d failed: %r", request.id, exc)
        request.chunks.put(exc)
        request.chunks.put(None)

    def _produce(self, request: Request, logits: np.ndarray) -> None:
        """Sample the request's next row from its pair's `[2, C, V]` logits; hand out finished audio."""
        item, row = request.item, request.row + 1
        request.tokens, request.row = item.sample(row, logits, request.options, request.rng), row
        audio = request.audio.after_row(item, row)
        if audio is not None:
            request.chunks.put(AudioChunk(request.id, audio, request.audio.ended))
        last = item.finished(row)
        if last:
            request.done = True
            self._retire(request)

    def _retire(self, request: Request) -> None:
        """Leave the batch and end the request's chunks."""
        self._leave(request)
        request.chunks.put(None)

    def _leave(self, request: Request) -> None:
        """Free the request's pair of rows (the last pair moves into them)."""
        moved = self.batch.remove(request.first_row)
        if moved is not None:
            mover = next(r for r in self.running if r.first_row == moved)
            mover.first_row = request.first_row
        self.running.remove(request)
        request.first_row = None

    def _loop(self) -> None:
        while True:
            with self.work:
                while not self.closed and not (self.waiting or self.running):
                    self.work.wait()
                if self.closed:
                    return
            try:
                self.step()
            except Exception as exc:  # fail the requests in flight, keep serving the next ones
                log.exception("decoder step failed")
                for request in self.running:
                    request.first_row = None
                    request.chunks.put(exc)
                self.running.clear()
                self.batch = BatchDecoder(self.dia.engine, self.batch.max_rows)  # no half-updated rows
