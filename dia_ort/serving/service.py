"""Speech requests -> audio chunks: checks a request, submits it, and hands its audio to the event loop.

A request runs on the continuous-batching scheduler. A long-form request runs part after part in a
thread of its own beside the scheduler (each part needs the one before it as its prompt); one runs
at a time, and another gets `QueueFull` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from dia_ort.longform import LongFormStream
from dia_ort.options import GenerationOptions
from dia_ort.scheduler import QueueFull, Scheduler
from dia_ort.serving.formats import FORMATS, available_formats
from dia_ort.serving.schemas import SpeechRequest
from dia_ort.serving.voices import Voice
from dia_ort.streaming import AudioChunk
from dia_ort.text import encode_text

if TYPE_CHECKING:
    from dia_ort.model import Dia

# Dia's options a request body carries (the rest of GenerationOptions is the server's to set)
OPTION_FIELDS = [f.name for f in fields(GenerationOptions) if f.name in SpeechRequest.model_fields]


@dataclass(frozen=True)
class Speech:
    """A checked request: the text (a voice's transcript first), its prompt codes, options and format."""

    text: str
    prompt: np.ndarray | None
    options: GenerationOptions
    format: str
    long_form: bool


class _Stopped(Exception):
    """Raised in a long-form request's thread when its client has gone."""


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

    def __init__(self, dia: Dia, scheduler: Scheduler, voices: dict[str, Voice]) -> None:
        self.dia, self.scheduler, self.voices = dia, scheduler, voices
        self.long_form_slot = threading.BoundedSemaphore(1)

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
        text = f"{voice.transcript} {body.input}" if voice.transcript else body.input
        values = {name: getattr(body, name) for name in OPTION_FIELDS}
        options = GenerationOptions(
            **values, sample_rate=FORMATS[body.response_format].sample_rate
        ).validate()
        if not body.long_form:
            encode_text(text, self.dia.config.text_length)  # over the window: an error naming long_form
        return Speech(text, voice.codes, options, body.response_format, body.long_form)

    def start(self, speech: Speech) -> SpeechStream:
        """Submit a checked request (raises QueueFull at the bound); iterate the result for its audio."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sink = _LoopSink(loop, queue)
        if not speech.long_form:
            request = self.scheduler.submit(speech.text, speech.prompt, sink=sink, **vars(speech.options))
            return SpeechStream(queue, request.cancel)
        if not self.long_form_slot.acquire(blocking=False):
            raise QueueFull("a long-form request is running; this server runs one at a time")
        stop = threading.Event()

        def stop_when_left(_step: int, _total: int) -> None:  # runs at every decoder step
            if stop.is_set():
                raise _Stopped

        try:
            parts = LongFormStream(
                self.dia,
                speech.text,
                speech.prompt,
                speech.options,
                *self.scheduler.chunking,
                callback=stop_when_left,
            )
        except BaseException:
            self.long_form_slot.release()
            raise
        threading.Thread(target=self._run_long_form, args=(parts, sink, stop), daemon=True).start()
        return SpeechStream(queue, stop.set)

    def _run_long_form(self, parts: LongFormStream, sink: _LoopSink, stop: threading.Event) -> None:
        try:
            for audio in parts:
                sink.put(AudioChunk(0, audio, last=False))
            sink.put(None)
        except _Stopped:  # the client left
            sink.put(None)
        except Exception as exc:  # handed to the response, which ends with it
            sink.put(exc)
        finally:
            self.long_form_slot.release()
