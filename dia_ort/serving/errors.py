"""Errors in OpenAI's shape, and which exception answers which status.

Every refusal is an `ApiError`. `api_error` maps the exceptions a request can raise by their type:
a full queue is 429, a closed scheduler 503, a bad value 400. Any other exception is a bug, and
stays a 500.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from dia_ort.scheduler import QueueFull, SchedulerClosed
from dia_ort.serving.schemas import ErrorBody, ErrorDetail

RETRY_AFTER_SECONDS = 1  # what a client is told to wait after a full queue


class ApiError(Exception):
    """An error answered in OpenAI's shape, with extra response headers."""

    def __init__(
        self, status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorBody(error=ErrorDetail(message=self.message, type=self.kind, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers or None)


def api_error(exc: Exception) -> ApiError | None:
    """The answer to an exception a speech request raised; None for one no client can cause."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return ApiError(429, str(exc), "rate_limit_exceeded", "queue_full", retry)
    if isinstance(exc, SchedulerClosed):
        return ApiError(503, str(exc), "server_error", "shutting_down")
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc), "invalid_request_error", "invalid_value")
    return None
