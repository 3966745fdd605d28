"""Continuous batching: many requests share one engine, each joining the running batch at the next step.

A small state machine in the spirit of vLLM's scheduler: `waiting` (a bounded FIFO) in front of the
decoding loop, which runs at most `max_batch` requests: Dia's on host cache rows (decoding.py,
batching.py), Dia2's a frame at a time (dia2/decoding.py). Each `step()` drops cancelled waiting requests and runs one step of the loop with the
waiting requests that fit the batch joining. A joint admission that fails is retried request by
request, so a request that cannot join fails alone and the batch goes on without it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from dia_ort.batching import HostRows
from dia_ort.decoding import ChunkedRequest, Decoding, Request, Sink
from dia_ort.item import PAIR
from dia_ort.options import GenerationOptions
from dia_ort.streaming import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, ItemStream, check_chunk_frames
from dia_ort.text import encode_text

if TYPE_CHECKING:
    from dia_ort.dia2.decoding import Dia2Requests
    from dia_ort.dia2.model import Dia2
    from dia_ort.dia2.prefix import PrefixConfig
    from dia_ort.model import AudioPrompt, Dia

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; try again later."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed (the server is stopping): it takes no more requests."""


class DiaRequests:
    """The scheduler's Dia side: a request from a text and its options, and the decoding loop."""

    def __init__(self, dia: Dia, chunking: tuple[int, int]) -> None:
        self.dia, self.chunking = dia, chunking

    def decoding(self, max_batch: int) -> Decoding:
        """A decoding loop on fresh host rows for `max_batch` requests."""
        return Decoding(HostRows(self.dia.engine, PAIR * max_batch), self.dia.config.num_channels)

    def new(self, id: int, text: str, audio_prompt: AudioPrompt | None, options: dict) -> Request:
        """A checked request (ValueError or TypeError says what is wrong)."""
        opts = GenerationOptions(**options).validate()
        ids = encode_text(text, self.dia.config.text_length)
        prompt = None if audio_prompt is None else self.dia.prompt_codes(audio_prompt)
        audio = ItemStream(self.dia.codec, opts.sample_rate, *self.chunking)
        return Request.new(id, self.dia.engine, ids, prompt, opts, audio)


def requests_of(model: Dia | Dia2, chunking: tuple[int, int]) -> DiaRequests | Dia2Requests:
    """The scheduler's side of `model`'s family (Dia2 streams its own chunks: one frame, then four)."""
    from dia_ort.dia2.model import Dia2

    if isinstance(model, Dia2):
        from dia_ort.dia2.decoding import Dia2Requests

        return Dia2Requests(model)
    return DiaRequests(model, chunking)


class Scheduler:
    """Runs requests on one model (Dia or Dia2) with continuous batching, in a thread of its own or by
    `step()`."""

    def __init__(
        self,
        model: Dia | Dia2,
        max_batch: int = 8,
        max_queue: int = 32,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_chunk_frames(first_chunk_frames, chunk_frames)
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.requests = requests_of(model, (first_chunk_frames, chunk_frames))
        self.decoding = self.requests.decoding(max_batch)
        self.waiting: deque[ChunkedRequest] = deque()
        self.ids = itertools.count(1)
        self.work = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.steps = 0  # decoder steps run, for metrics
        self.step_times: deque[float] = deque(maxlen=64)  # when the last steps ended

    @property
    def running(self) -> list[ChunkedRequest]:
        """The requests in the batch."""
        return self.decoding.running

    # -- the caller's side --------------------------------------------------------------------------

    def submit(
        self,
        text: str,
        audio_prompt: AudioPrompt | PrefixConfig | None = None,
        sink: Sink | None = None,
        **options: Any,
    ) -> ChunkedRequest:
        """Queue a request (checked here, in the caller's thread); raises QueueFull at the bound. The
        prompt is Dia's audio prompt or Dia2's prefix.

        Its chunks go to `sink` (for example an asyncio queue fed thread-safely), else to a queue that
        iterating the request reads.
        """
        request = self.requests.new(next(self.ids), text, audio_prompt, options)
        if sink is not None:
            request.chunks = sink
        with self.work:
            if self.closed:
                raise SchedulerClosed("the scheduler is closed")
            self.check_room()
            self.waiting.append(request)
            self.work.notify()
        return request

    def check_room(self) -> None:
        """Raise QueueFull when one more request would pass the queue's bound.

        Requests that free rows will take at the next step are not queued beyond the batch: a burst
        that arrives during one step fills the batch first (Ray's proxy counts on it).
        """
        free_rows = self.max_batch - len(self.running)
        if len(self.waiting) >= self.max_queue + free_rows:
            raise QueueFull(
                f"the batch is full and {len(self.waiting) - free_rows} requests are waiting "
                "(the most this server queues)"
            )

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
        steps = self.decoding.steps
        try:
            self.decoding.step()
        except Exception:  # the running requests fail (`_loop`); the admitted ones wait for the next step
            with self.work:
                self.waiting.extendleft(reversed(admitted))
            raise
        if admitted:
            self._join(admitted)
        if self.decoding.steps != steps:
            self.steps += 1
            self.step_times.append(time.perf_counter())
        return bool(self.running or self.waiting)

    def _join(self, requests: list[ChunkedRequest]) -> None:
        """Admit `requests` together; where their joint admission fails, each joins alone."""
        try:
            self.decoding.join(requests)
        except Exception as exc:
            if len(requests) == 1:
                self.decoding.fail(requests[0], exc)
                return
            log.warning(
                "admitting %d requests together failed (%r); admitting each alone", len(requests), exc
            )
            for request in requests:
                self._join([request])

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
                    request.chunks.put(exc)
                self.decoding = self.requests.decoding(self.max_batch)  # no half-updated rows
