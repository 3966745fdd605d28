"""The FastAPI app: OpenAI's speech routes, voices, models, health, metrics and the web page.

`create_app(...)` builds it from a loaded `Dia`, so tests and `dia-ort serve` share one factory. Bad
requests answer 400, a wrong API key 401 and a body over `MAX_BODY_BYTES` 413, in OpenAI's error
shape; a full queue, or a caller over its request rate, answers 429 with Retry-After. Nothing a
client sends makes a 500.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dia_ort.scheduler import QueueFull, Scheduler
from dia_ort.serving.formats import FORMATS, AudioEncoder, available_formats
from dia_ort.serving.limits import BodyLimit, RequestRate
from dia_ort.serving.schemas import ErrorBody, ErrorDetail, SpeechRequest
from dia_ort.serving.service import SpeechService, SpeechStream
from dia_ort.serving.voices import Voice

if TYPE_CHECKING:
    from dia_ort.model import Dia

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MODEL_ID = "dia"
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dia_ort_speech_requests", "Speech requests by outcome", ["status"], registry=self.registry
        )
        queue = Gauge("dia_ort_queue_depth", "Requests waiting for a batch row", registry=self.registry)
        queue.set_function(lambda: scheduler.queue_depth)
        batch = Gauge("dia_ort_batch_size", "Requests in the running batch", registry=self.registry)
        batch.set_function(lambda: scheduler.occupancy)
        rate = Gauge("dia_ort_steps_per_second", "Decoder steps per second, recent", registry=self.registry)
        rate.set_function(lambda: scheduler.steps_per_second)
        steps = Gauge("dia_ort_decoder_steps", "Decoder steps run since the start", registry=self.registry)
        steps.set_function(lambda: scheduler.steps)
        self.first_audio = Histogram(
            "dia_ort_time_to_first_audio_seconds",
            "From submission to the first audio chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )


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
    """Load the model and voices, start the scheduler, and return the app; the scheduler stops with it."""
    from dia_ort.model import Dia
    from dia_ort.serving.voices import load_voices

    dia = Dia.from_pretrained(
        settings.model, compute_dtype=settings.dtype, device=settings.device, threads=settings.threads
    )
    voices = load_voices(dia, settings.voices, strict=settings.strict_voices)
    scheduler = Scheduler(dia, max_batch=settings.max_batch, max_queue=settings.max_queue).start()
    return create_app(
        dia, scheduler, voices, api_key=settings.api_key, requests_per_minute=settings.requests_per_minute
    )


def create_app(
    dia: Dia,
    scheduler: Scheduler,
    voices: dict[str, Voice],
    api_key: str | None = None,
    requests_per_minute: int | None = None,
) -> FastAPI:
    """The speech server's app over a started `scheduler` of `dia`; it closes the scheduler at shutdown.

    `api_key` holds one key or several separated by commas; `requests_per_minute` bounds the speech
    requests each key (or client address, without keys) may start a minute.
    """
    service = SpeechService(dia, scheduler, voices)
    metrics = Metrics(scheduler)
    keys = [key.strip().encode() for key in (api_key or "").split(",") if key.strip()]
    rate = None if requests_per_minute is None else RequestRate(requests_per_minute)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(
        title="dia-ort", description="Dia text-to-dialogue, OpenAI-compatible speech API", lifespan=lifespan
    )
    app.state.scheduler = scheduler  # for health checks from outside the routes (Ray's)
    app.add_middleware(BodyLimit)

    def authorized(request: Request) -> str:
        """The caller, for its request rate: its key, or its address on a server without keys."""
        if not keys:
            return "address " + (request.client.host if request.client else "unknown")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode() if scheme.lower() == "bearer" else b""
        # every key is compared, each in constant time, so the time taken does not tell which matched
        matched = [key for key in keys if hmac.compare_digest(given_bytes, key)]
        if not matched:
            raise ApiError(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
        return "key " + matched[0].decode()

    guarded = [Depends(authorized)]

    def counted(caller: str) -> tuple[dict[str, str], JSONResponse | None]:
        """Count a speech request against its caller's rate: OpenAI's rate headers for the response,
        and the 429 to answer instead when the caller is over its rate."""
        if rate is None:
            return {}, None
        left, wait = rate.take(caller)
        headers = {
            "x-ratelimit-limit-requests": str(rate.per_minute),
            "x-ratelimit-remaining-requests": str(left),
        }
        if not wait:
            return headers, None
        metrics.requests.labels("429").inc()
        message = f"rate limit reached: {rate.per_minute} speech requests a minute; try again in {wait:.1f} s"
        refusal = error_response(
            429,
            message,
            "requests",
            "rate_limit_exceeded",
            **{"Retry-After": str(math.ceil(wait))},
            **headers,
        )
        return headers, refusal

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        metrics.requests.labels("400").inc()
        return error_response(400, f"invalid request: {problems}", "invalid_request_error", "invalid_body")

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, caller: str = Depends(authorized)) -> Response:
        rate_headers, refusal = counted(caller)
        if refusal is not None:
            return refusal
        try:
            prepared = service.prepare(body)
            encoder = AudioEncoder(prepared.format)
            stream = service.start(prepared)
        except QueueFull as exc:
            metrics.requests.labels("429").inc()
            return error_response(
                429,
                str(exc),
                "rate_limit_exceeded",
                "queue_full",
                **{"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except (ValueError, TypeError) as exc:
            metrics.requests.labels("400").inc()
            return error_response(400, str(exc), "invalid_request_error", "invalid_value")
        except RuntimeError as exc:  # the scheduler is shutting down
            metrics.requests.labels("503").inc()
            return error_response(503, str(exc), "server_error", "shutting_down")
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
                {"name": v.name, "prompt": v.codes is not None, "transcript": v.transcript}
                for v in sorted(voices.values(), key=lambda v: v.name)
            ],
            "formats": available_formats(),
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "dia-ort"}]}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "ready": scheduler.alive,
            "queue_depth": scheduler.queue_depth,
            "max_queue": scheduler.max_queue,
            "batch_occupancy": scheduler.occupancy,
            "max_batch": scheduler.max_batch,
            "compute_dtype": dia.compute_dtype,
        }

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


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
