"""The request and response bodies of the speech server, with their bounds (OpenAI's schema plus Dia's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INPUT_CHARS = 100_000  # a long-form script; without long_form the model's text window applies


class SpeechRequest(BaseModel):
    """`POST /v1/audio/speech`: OpenAI's fields, then Dia's options as extra body fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=128)
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str = Field(max_length=64)
    response_format: str = Field("mp3", max_length=16)
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = Field(None, max_length=4096)  # OpenAI's voice instructions: refused when set
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1028)
    cfg_scale: float = Field(3.0, ge=0.0, le=100.0)
    cfg_filter_top_k: int | None = Field(None, ge=1, le=1028)
    max_new_tokens: int = Field(2048, ge=1, le=3072)
    long_form: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "code"}}`."""

    error: ErrorDetail
