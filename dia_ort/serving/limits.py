"""The server's limits on what one client can ask of it: body size and request rate.

FastAPI reads a whole body before it validates a field's length, so without `BodyLimit` a client
could make the server hold any amount of memory with one request. A body declared or found larger
than the bound gets 413 in OpenAI's error shape, and the connection's remaining body is not read.

`RequestRate` keeps one client from taking every batch row and queue place: each API key (or client
address, on a server without keys) may start so many speech requests a minute.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dia_ort.serving.errors import ApiError
from dia_ort.serving.schemas import ErrorBody, ErrorDetail

# The longest body a valid request can have: MAX_INPUT_CHARS characters written as JSON escapes of
# surrogate pairs (12 bytes each), with room for the other fields.
MAX_BODY_BYTES = 2 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: answer 413 to a body over `max_bytes`, by its Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body with no Content-Length
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the 413 went out: whatever the app answers to the disconnect is dropped
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        detail = ErrorDetail(
            message=f"the request body is larger than {self.max_bytes} bytes",
            type="invalid_request_error",
            code="body_too_large",
        )
        body = ErrorBody(error=detail).model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestRate:
    """Requests a minute for each caller: a token bucket of `per_minute` tokens per caller, refilled
    evenly over a minute, so a caller may start its minute's share at once and then goes at the rate.

    A caller whose bucket has refilled is as if never seen; such callers are dropped once more than
    `MAX_CALLERS` are known, so the table holds about the callers of the last minute.
    """

    MAX_CALLERS = 10_000

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"the request rate must be at least 1 a minute, got {per_minute}")
        self.per_minute, self.clock = per_minute, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when they were counted)
        self.lock = threading.Lock()

    def count(self, caller: str) -> dict[str, str]:
        """Count a speech request of `caller`: OpenAI's rate headers for its response; a 429 with
        them and Retry-After when the caller is over its rate."""
        left, wait = self.take(caller)
        headers = {
            "x-ratelimit-limit-requests": str(self.per_minute),
            "x-ratelimit-remaining-requests": str(left),
        }
        if wait:
            message = (
                f"rate limit reached: {self.per_minute} speech requests a minute; try again in {wait:.1f} s"
            )
            retry = {"Retry-After": str(math.ceil(wait))}
            raise ApiError(429, message, "requests", "rate_limit_exceeded", retry | headers)
        return headers

    def take(self, caller: str) -> tuple[int, float]:
        """Count a request of `caller`: (requests left, 0.0), or (0, seconds until the next one may
        start) when it is over its rate; a refused request is not counted."""
        now = self.clock()
        with self.lock:
            tokens = self._tokens(caller, now)
            if tokens < 1:
                return 0, (1 - tokens) * 60 / self.per_minute
            self.buckets[caller] = (tokens - 1, now)
            if len(self.buckets) > self.MAX_CALLERS:
                self.buckets = {
                    c: b for c, b in self.buckets.items() if self._tokens(c, now) < self.per_minute
                }
            return int(tokens - 1), 0.0

    def _tokens(self, caller: str, now: float) -> float:
        tokens, when = self.buckets.get(caller, (self.per_minute, now))
        return min(float(self.per_minute), tokens + (now - when) * self.per_minute / 60)
