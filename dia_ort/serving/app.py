"""The FastAPI app: OpenAI's speech routes, voices, models, health, metrics and the web page.

`create_app(...)` builds it from a loaded `Dia`, so tests and `dia-ort serve` share one factory. Bad
requests answer 400, a wrong API key 401 and a body over `MAX_BODY_BYTES` 413, in OpenAI's error
shape; a full queue, or a caller over its request rate, answers 429 with Retry-After. Nothing a
client sends makes a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dia_ort.hub import model_family
from dia_ort.scheduler import Scheduler
from dia_ort.serving.auth import ApiKeys
from dia_ort.serving.errors import ApiError, api_error
from dia_ort.serving.formats import FORMATS, AudioEncoder, available_formats
from dia_ort.serving.limits import BodyLimit, RequestRate
from dia_ort.serving.metrics import Metrics
from dia_ort.serving.schemas import SpeechRequest, VoiceUpload
from dia_ort.serving.service import SpeechService, SpeechStream
from dia_ort.serving.voices import Voice, upload_voice

if TYPE_CHECKING:
    from dia_ort.dia2 import Dia2
    from dia_ort.model import Dia

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServerSettings:
    """What `dia-ort serve` takes: the model to load and the server's limits (one per process or replica)."""

    model: str
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None  # ONNX Runtime's CPU threads (default: one per physical core)
    voices: str | None = None
    strict_voices: bool = False
    api_key: str | None = None  # one key, or several separated by commas
    requests_per_minute: int | None = None  # speech requests a key (or address) may start a minute
    max_batch: int = 8
    max_queue: int = 32

    def __post_init__(self) -> None:
        if self.requests_per_minute is not None:
            RequestRate(self.requests_per_minute)  # a bad rate is refused before the model loads


def build_app(settings: ServerSettings) -> FastAPI:
    """Load the model (Dia or Dia2, as its folder says) and voices, start the scheduler, and return the
    app; the scheduler stops with it."""
    from dia_ort.dia2 import Dia2
    from dia_ort.model import Dia
    from dia_ort.serving.voices import load_voices

    family = Dia2 if model_family(settings.model) == "dia2" else Dia
    dia = family.from_pretrained(
        settings.model, compute_dtype=settings.dtype, device=settings.device, threads=settings.threads
    )
    voices = load_voices(dia, settings.voices, strict=settings.strict_voices)
    scheduler = Scheduler(dia, max_batch=settings.max_batch, max_queue=settings.max_queue).start()
    return create_app(
        dia, scheduler, voices, api_key=settings.api_key, requests_per_minute=settings.requests_per_minute
    )


def create_app(
    dia: Dia | Dia2,
    scheduler: Scheduler,
    voices: dict[str, Voice],
    api_key: str | None = None,
    requests_per_minute: int | None = None,
) -> FastAPI:
    """The speech server's app over a started `scheduler` of `dia` (a Dia or a Dia2); it closes the
    scheduler at shutdown.

    `api_key` holds one key or several separated by commas; `requests_per_minute` bounds the speech
    requests each key (or client address, without keys) may start a minute.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(
        title="dia-ort", description="Dia text-to-dialogue, OpenAI-compatible speech API", lifespan=lifespan
    )
    app.state.scheduler = scheduler  # for health checks from outside the routes (Ray's)
    app.add_middleware(BodyLimit)
    metrics = Metrics(scheduler)
    rate = None if requests_per_minute is None else RequestRate(requests_per_minute)
    _add_error_handlers(app, metrics)
    _add_routes(app, SpeechService(dia, scheduler, voices), ApiKeys(api_key), rate, metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer refusals and invalid bodies in OpenAI's error shape (a body that fails validation is a 400)."""

    @app.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        metrics.requests.labels("400").inc()
        error = ApiError(400, f"invalid request: {problems}", "invalid_request_error", "invalid_body")
        return error.response()


def _add_routes(
    app: FastAPI, service: SpeechService, keys: ApiKeys, rate: RequestRate | None, metrics: Metrics
) -> None:
    """OpenAI's speech route, the voices and models lists, health, metrics and the web page."""
    scheduler = service.scheduler
    guarded = [Depends(keys.caller)]

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, caller: str = Depends(keys.caller)) -> Response:
        try:
            rate_headers = {} if rate is None else rate.count(caller)
            prepared = service.prepare(body)
            encoder = AudioEncoder(prepared.format)
            stream = await service.start(prepared)
        except Exception as exc:
            error = api_error(exc)
            if error is None:
                raise
            metrics.requests.labels(str(error.status)).inc()
            return error.response()
        metrics.requests.labels("200").inc()
        encoded = _encoded(stream, encoder, metrics)
        if body.stream_format == "sse":
            return StreamingResponse(_events(encoded), media_type="text/event-stream", headers=rate_headers)
        return StreamingResponse(
            encoded, media_type=FORMATS[prepared.format].media_type, headers=rate_headers
        )

    @app.get("/v1/audio/voices", dependencies=guarded)
    async def list_voices() -> dict:
        return {
            "voices": [
                {"name": v.name, "prompt": v.prompt is not None, "transcript": v.transcript}
                for v in sorted(service.voices.values(), key=lambda v: v.name)
            ],
            "formats": available_formats(),
        }

    @app.post("/v1/audio/voices", dependencies=guarded, status_code=201)
    async def add_voice(body: VoiceUpload) -> dict:
        """Clone a voice from a clip (the page's upload and recording): stored beside the startup voices."""
        dia = service.dia
        try:
            voice = await asyncio.to_thread(
                upload_voice, dia, service.voices, body.name, body.transcript, body.audio
            )
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_voice") from exc
        return {"name": voice.name, "transcript": voice.transcript, "seconds": round(voice.seconds, 2)}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        family = "dia2" if service.dia2 else "dia"
        return {"object": "list", "data": [{"id": family, "object": "model", "owned_by": "dia-ort"}]}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "ready": scheduler.alive,
            "queue_depth": scheduler.queue_depth,
            "max_queue": scheduler.max_queue,
            "batch_occupancy": scheduler.occupancy,
            "max_batch": scheduler.max_batch,
            "model": service.dia.folder.name,
            "family": "dia2" if service.dia2 else "dia",
            "compute_dtype": service.dia.compute_dtype,
        }

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


async def _encoded(stream: SpeechStream, encoder: AudioEncoder, metrics: Metrics) -> AsyncIterator[bytes]:
    """The request's audio in its response format, sent as it is encoded."""
    observed = False
    try:
        async for audio in stream:
            if not observed:
                metrics.first_audio.observe(stream.first_audio)
                observed = True
            data = encoder.encode(audio)
            if data:
                yield data
        tail = encoder.finish()
        if tail:
            yield tail
    finally:
        stream.cancel()  # also when the response ends before the stream was first read


async def _events(encoded: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """OpenAI's server-sent events: `speech.audio.delta` with base64 audio, then `speech.audio.done`."""
    async for data in encoded:
        yield (
            "data: "
            + json.dumps({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            + "\n\n"
        )
    yield "data: " + json.dumps({"type": "speech.audio.done"}) + "\n\n"
