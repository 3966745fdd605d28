"""Speech requests -> audio chunks: checks a request, submits it, and hands its audio to the event loop.

Every request runs on the continuous-batching scheduler, of a Dia or a Dia2 model. Dia2 takes the
options it has (seed, cfg_scale, cfg_filter_top_k) and no long-form scripts. A long-form request's
parts are requests of the scheduler too, submitted one after another (each part needs the one before
it as its prompt) by a thread of the request's own, which only waits for each part's audio: the
scheduler's loop is the one that runs the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from queue import Empty
from typing import TYPE_CHECKING

import numpy as np

from dia_ort.decoding import Request
from dia_ort.item import ItemState
from dia_ort.longform import LongFormStream
from dia_ort.options import GenerationOptions
from dia_ort.scheduler import QueueFull, Scheduler
from dia_ort.serving.formats import FORMATS, available_formats
from dia_ort.serving.schemas import SpeechRequest
from dia_ort.serving.voices import Voice
from dia_ort.streaming import AudioChunk
from dia_ort.text import encode_text

if TYPE_CHECKING:
    from dia_ort.dia2 import Dia2
    from dia_ort.model import Dia

STOP_POLL_SECONDS = 0.05  # how soon a long-form request notices that its client has gone
# Dia's options a request body carries (the rest of GenerationOptions is the server's to set)
OPTION_FIELDS = [f.name for f in fields(GenerationOptions) if f.name in SpeechRequest.model_fields]
DIA2_OPTIONS = {"seed": "seed", "cfg_scale": "cfg_scale", "cfg_filter_top_k": "cfg_filter_k"}  # body -> Dia2


@dataclass(frozen=True)
class Speech:
    """A checked request: the text (a Dia voice's transcript first), its prompt, options and format."""

    text: str
    prompt: object  # Dia's prompt codes, Dia2's prefix, or None
    options: GenerationOptions | None  # Dia's; None for Dia2
    format: str
    long_form: bool
    keywords: dict  # the options as the scheduler's `submit` takes them


class _Stopped(Exception):
    """Raised in a long-form request's thread when its client has gone."""


def _part_chunks(request: Request, stop: threading.Event) -> Iterator[AudioChunk]:
    """A long-form part's chunks as the scheduler hands them out; cancels it once the client has gone, or
    when whoever reads them stops (a no-op once the part has ended)."""
    try:
        while not stop.is_set():
            try:
                chunk = request.chunks.get(timeout=STOP_POLL_SECONDS)
            except Empty:
                continue
            if chunk is None:
                return
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk
        raise _Stopped
    finally:
        request.cancel()


class _LoopSink:
    """Hands chunks from the scheduler's thread to an asyncio queue on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue

    def put(self, item: AudioChunk | Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (the server stops): nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class SpeechStream:
    """The audio of one submitted request, as float32 chunks; closing it early cancels the request."""

    def __init__(self, queue: asyncio.Queue, cancel: Callable[[], None]) -> None:
        self.queue, self.cancel = queue, cancel
        weakref.finalize(self, cancel)  # a response dropped before its body was read still cancels
        self.started = time.perf_counter()
        self.first_audio: float | None = None  # seconds from submission to the first audio

    async def __aiter__(self) -> AsyncIterator[np.ndarray]:
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                if len(item.audio):
                    if self.first_audio is None:
                        self.first_audio = time.perf_counter() - self.started
                    yield item.audio
        finally:
            self.cancel()  # a no-op once the request has ended; frees its rows when the client left


class SpeechService:
    """Maps `SpeechRequest`s to the scheduler, with the server's voices."""

    def __init__(self, dia: Dia | Dia2, scheduler: Scheduler, voices: dict[str, Voice]) -> None:
        from dia_ort.dia2 import Dia2

        self.dia, self.scheduler, self.voices = dia, scheduler, voices
        self.dia2 = isinstance(dia, Dia2)

    def prepare(self, body: SpeechRequest) -> Speech:
        """Check a request against the model, the voices and the formats; ValueError says what is wrong."""
        if body.speed != 1.0:
            raise ValueError(
                f"speed {body.speed} is not supported: Dia speaks at its own pace; use speed 1.0"
            )
        if body.instructions:
            raise ValueError(
                "instructions are not supported: write the delivery into the text, e.g. (laughs)"
            )
        if body.response_format not in available_formats():
            raise ValueError(
                f"response_format {body.response_format!r} is not available; use one of {available_formats()}"
            )
        voice = self.voices.get(body.voice)
        if voice is None:
            raise ValueError(f"unknown voice {body.voice!r}; the voices are {sorted(self.voices)}")
        rate = FORMATS[body.response_format].sample_rate
        if self.dia2:
            return self._prepare_dia2(body, voice, rate)
        text = f"{voice.transcript} {body.input}" if voice.transcript else body.input
        values = {name: getattr(body, name) for name in OPTION_FIELDS}
        options = GenerationOptions(**values, sample_rate=rate).validate()
        if not body.long_form:
            encode_text(text, self.dia.config.text_length)  # over the window: an error naming long_form
        return Speech(text, voice.codes, options, body.response_format, body.long_form, vars(options))

    def _prepare_dia2(self, body: SpeechRequest, voice: Voice, rate: int) -> Speech:
        if body.long_form:
            raise ValueError("long_form is Dia's; Dia2 speaks a script whole in one request")
        given = sorted(
            name for name in set(OPTION_FIELDS) & body.model_fields_set if name not in DIA2_OPTIONS
        )
        if given:
            raise ValueError(f"{given}: not options of Dia2; it takes {sorted(DIA2_OPTIONS)}")
        keywords = {
            key: getattr(body, name) for name, key in DIA2_OPTIONS.items() if name in body.model_fields_set
        }
        return Speech(
            body.input, voice.prefix, None, body.response_format, False, keywords | {"sample_rate": rate}
        )

    async def start(self, speech: Speech) -> SpeechStream:
        """Submit a checked request (raises QueueFull at the bound); iterate the result for its audio.

        Submitting runs off the event loop: it checks the request and, for Dia2, reads the voice's
        prefix (Mimi's encoder, the first time a voice is used)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sink = _LoopSink(loop, queue)
        if not speech.long_form:
            submit = partial(self.scheduler.submit, speech.text, speech.prompt, sink=sink, **speech.keywords)
            request = await asyncio.to_thread(submit)
            return SpeechStream(queue, request.cancel)
        self.scheduler.check_room()  # a script's first part queues like any request
        stop = threading.Event()
        parts = LongFormStream(
            partial(self._run_part, stop),
            self.dia.config,
            self.dia.engine.frame_rate,
            speech.text,
            speech.prompt,
            speech.options,
        )
        threading.Thread(target=self._run_long_form, args=(parts, sink), daemon=True).start()
        return SpeechStream(queue, stop.set)

    def _run_part(
        self, stop: threading.Event, text: str, prompt: np.ndarray | None, options: GenerationOptions
    ) -> tuple[ItemState, Iterator[AudioChunk]]:
        """Submit a long-form part to the scheduler (waiting for a place in its queue while the client
        stays); its item, and its chunks as they come."""
        while True:
            if stop.is_set():
                raise _Stopped
            try:
                request = self.scheduler.submit(text, prompt, **vars(options))
            except QueueFull:
                time.sleep(STOP_POLL_SECONDS)
                continue
            return request.item, _part_chunks(request, stop)

    def _run_long_form(self, parts: LongFormStream, sink: _LoopSink) -> None:
        try:
            for audio in parts:
                sink.put(AudioChunk(0, audio, last=False))
            sink.put(None)
        except _Stopped:  # the client left
            sink.put(None)
        except Exception as exc:  # handed to the response, which ends with it
            sink.put(exc)
