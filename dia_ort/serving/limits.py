"""A bound on request bodies, enforced while they arrive, before any route parses them.

FastAPI reads a whole body before it validates a field's length, so without this a client could
make the server hold any amount of memory with one request. A body declared or found larger than
the bound gets 413 in OpenAI's error shape, and the connection's remaining body is not read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
