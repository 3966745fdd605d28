"""Dia's text input: UTF-8 bytes with the speaker tags [S1] -> byte 1 and [S2] -> byte 2 (docs/generation.md section 4)."""

from __future__ import annotations

import re

import numpy as np

SPEAKER_TAGS = {"[S1]": b"\x01", "[S2]": b"\x02"}
_TAG_LIKE = re.compile(r"\[S\d+\]", re.IGNORECASE)


def encode_text(text: str, text_length: int) -> np.ndarray:
    """Text -> int64 byte ids `[L]`, L <= text_length; refuses what the model cannot read.

    Never truncates: a text over the window is an error with the byte count and the limit.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty; give a line such as '[S1] Hello there.'")
    unknown = sorted({tag for tag in _TAG_LIKE.findall(text) if tag not in SPEAKER_TAGS})
    if unknown:
        raise ValueError(f"unknown speaker tags {unknown}: Dia knows only [S1] and [S2]")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, as from a bad decode of UTF-16
        raise ValueError(
            f"text is not valid unicode: {text[exc.start : exc.end]!r} at character {exc.start} "
            "is half of a surrogate pair"
        ) from exc
    for tag, byte in SPEAKER_TAGS.items():
        data = data.replace(tag.encode(), byte)
    if len(data) > text_length:
        raise ValueError(
            f"text is {len(data)} bytes but the model reads at most {text_length}; "
            "pass long_form=True (--long-form on the command line) to generate it in parts, "
            "or split it into shorter requests"
        )
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
