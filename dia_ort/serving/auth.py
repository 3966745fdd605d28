"""Who is calling: the bearer API keys a server requires, and the caller a request rate is counted for."""

from __future__ import annotations

import hmac

from fastapi import Request

from dia_ort.serving.errors import ApiError


class ApiKeys:
    """The keys a server accepts (none: every caller is welcome, and is known by its address)."""

    def __init__(self, api_key: str | None) -> None:
        self.keys = [key.strip().encode() for key in (api_key or "").split(",") if key.strip()]

    def caller(self, request: Request) -> str:
        """The caller, for its request rate: its key, or its address on a server without keys.
        A FastAPI dependency: a wrong or missing key is a 401."""
        if not self.keys:
            return "address " + (request.client.host if request.client else "unknown")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode() if scheme.lower() == "bearer" else b""
        # every key is compared, each in constant time, so the time taken does not tell which matched
        matched = [key for key in self.keys if hmac.compare_digest(given_bytes, key)]
        if not matched:
            raise ApiError(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
        return "key " + matched[0].decode()
