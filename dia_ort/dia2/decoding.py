"""Dia2 requests decoded together, for the server's scheduler (`dia_ort.scheduler`).

`Dia2Requests` makes the requests and `Dia2Decoding` has the interface of Dia's
`dia_ort.decoding.Decoding` (`running`, `steps`, `join`, `step`, `fail`), so one scheduler runs
either family. Each step runs one frame of every running request in one `FrameBatch`, then hands out
the audio that frame completed, resampled to the request's rate; a request gets the same codes and
audio alone as in any batch.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field

import numpy as np

from dia_ort.audio import StreamResampler
from dia_ort.decoding import ChunkedRequest, Sink
from dia_ort.dia2.batch import FrameBatch
from dia_ort.dia2.model import CHUNK_FRAMES, Dia2, GenerationResult, SpeechAudio
from dia_ort.dia2.prefix import PrefixConfig
from dia_ort.dia2.script import ScriptReader
from dia_ort.streaming import AudioChunk

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Dia2Request(ChunkedRequest):
    """One Dia2 script from submission to its last chunk; iterate it for its float32 audio (with the
    default sink), `cancel()` to leave at the next step, `result` once it is done."""

    id: int
    audio: SpeechAudio  # its generation (`audio.loop`) and the chunks it completes
    resampler: StreamResampler | None
    chunks: Sink = field(default_factory=queue.SimpleQueue)
    result: GenerationResult | None = None
    cancelled: bool = False
    done: bool = False

    def hand_out(self, chunks: list[np.ndarray], last: bool) -> None:
        """Put a frame's chunks to the sink, resampled; with `last`, the resampler's tail too."""
        if last and not chunks:
            chunks = [np.zeros(0, np.float32)]
        for index, audio in enumerate(chunks):
            end = last and index == len(chunks) - 1
            if self.resampler is not None:
                audio = self.resampler.resample_chunk(audio, last=end)
            self.chunks.put(AudioChunk(self.id, audio, end))


class Dia2Requests:
    """The scheduler's Dia2 side: a request from a script and its options, and the decoding loop.

    A request takes `Dia2.stream`'s options (the server passes seed, cfg_scale and cfg_filter_k) and
    the sample rate to resample to; its prompt is a `PrefixConfig` (the voice to continue). Audio comes
    one frame first, then CHUNK_FRAMES at a time, as from `Dia2.stream` (the scheduler's chunk sizes
    are Dia's).
    """

    def __init__(self, model: Dia2) -> None:
        self.model = model

    def decoding(self, max_batch: int) -> Dia2Decoding:
        return Dia2Decoding(self.model, max_batch)

    def new(self, id: int, text: str, prefix: PrefixConfig | None, options: dict) -> Dia2Request:
        """A checked request (ValueError or TypeError says what is wrong)."""
        options = dict(options)
        rate = options.pop("sample_rate", None) or self.model.sample_rate
        model = self.model
        reader = ScriptReader(model.tokenizer.encode, model.tokenizer.ids, model.frame_rate)
        if not isinstance(text, str):
            raise TypeError(f"a request's script is a string, got {type(text).__name__}")
        if not reader.feed(text) + reader.close():
            raise ValueError("script is empty: give the text to speak, e.g. '[S1] Hello there.'")
        audio = model.stream(text, prefix=prefix, chunk_frames=CHUNK_FRAMES, **options).audio
        resampler = None if rate == model.sample_rate else StreamResampler(rate, model.sample_rate)
        return Dia2Request(id, audio, resampler)


class Dia2Decoding:
    """Dia2 requests on one `FrameBatch` of up to `max_batch` generations."""

    def __init__(self, model: Dia2, max_batch: int) -> None:
        self.batch = FrameBatch(model.config, model.graphs, max_batch)
        self.running: list[Dia2Request] = []

    @property
    def steps(self) -> int:
        """Frames run (for the scheduler's metrics)."""
        return self.batch.frames

    def join(self, requests: list[Dia2Request]) -> None:
        """Admit `requests` (each one's prefix fed in calls of its own); a request that cannot join fails
        alone."""
        for request in requests:
            try:
                self.batch.join(request.audio.loop)
            except Exception as exc:
                self.fail(request, exc)
                continue
            self.running.append(request)

    def step(self) -> None:
        """Drop cancelled requests, run one frame of the others, hand out the audio it completed."""
        for request in [r for r in self.running if r.cancelled]:
            self.batch.leave(request.audio.loop)
            self._retire(request)
        if not self.running:
            return
        ended = self.batch.step()
        for request in [r for r in self.running if r.audio.loop in self.batch.failed]:
            self.running.remove(request)
            self.fail(request, self.batch.failed[request.audio.loop])
        for request in list(self.running):
            stepped = request.audio.loop not in ended
            try:
                request.hand_out(request.audio.after_frame(stepped), last=not stepped)
                if not stepped:
                    request.result, request.done = request.audio.result(), True
            except Exception as exc:  # its audio failed: it leaves alone, the others go on
                if stepped:
                    self.batch.leave(request.audio.loop)
                self.running.remove(request)
                self.fail(request, exc)
                continue
            if not stepped:
                self._retire(request)

    def fail(self, request: Dia2Request, exc: Exception) -> None:
        """End a request that is not running with `exc`."""
        log.error("request %d failed: %r", request.id, exc)
        request.chunks.put(exc)
        request.chunks.put(None)

    def _retire(self, request: Dia2Request) -> None:
        self.running.remove(request)
        request.chunks.put(None)
