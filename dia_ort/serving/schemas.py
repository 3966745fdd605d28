"""The request and response bodies of the speech server, with their bounds (OpenAI's schema plus Dia's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dia_ort.options import OPTIONS

MAX_INPUT_CHARS = 100_000  # a long-form script; without long_form the model's text window applies
MAX_VOICE_BASE64 = 2_000_000  # the request body's bound (limits.MAX_BODY_BYTES) leaves room for no more


def option_field(name: str) -> Any:
    """The request field of a GenerationOptions option: its default, range and help."""
    option = OPTIONS[name]
    bound = option.metadata["bound"]
    low = {"gt" if bound.open_low else "ge": bound.low}
    return Field(option.default, le=bound.high, description=option.metadata["help"], **low)


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
    seed: int | None = option_field("seed")
    temperature: float = option_field("temperature")
    top_p: float = option_field("top_p")
    top_k: int | None = option_field("top_k")
    cfg_scale: float = option_field("cfg_scale")
    cfg_filter_top_k: int | None = option_field("cfg_filter_top_k")
    max_new_tokens: int = option_field("max_new_tokens")
    long_form: bool = False


class VoiceUpload(BaseModel):
    """`POST /v1/audio/voices`: a clip to clone a voice from, and the words it speaks."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    transcript: str = Field(min_length=1, max_length=4096)
    audio: str = Field(min_length=1, max_length=MAX_VOICE_BASE64)  # base64 of a file libsndfile reads


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "code"}}`."""

    error: ErrorDetail
