"""Named voices for the server: `NAME.wav|flac|mp3` with `NAME.txt` (its transcript) in a folder.

Each voice is encoded once at startup and kept as codes. A request names a voice; the name is only
ever a key into this table, never part of a path. OpenAI's built-in voice names mean "no prompt"
unless the folder has a voice of that name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dia_ort.model import Dia

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer", "verse"
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Voice:
    """A voice prompt: its DAC codes `[T, C]` and the transcript that goes before the request's text."""

    name: str
    codes: np.ndarray | None  # None: no prompt (an OpenAI name the folder does not define)
    transcript: str = ""


def load_voices(dia: Dia, folder: str | Path | None, strict: bool = False) -> dict[str, Voice]:
    """Every voice of `folder` plus OpenAI's names; a voice that cannot be read is skipped with a
    warning that names the file and why (or refused with `strict`)."""
    voices = {name: Voice(name, None) for name in OPENAI_VOICES}
    if folder is None:
        return voices
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder {folder} does not exist")
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        try:
            voices[audio.stem] = _load_voice(dia, folder, audio)
        except (ValueError, OSError) as exc:
            if strict:
                raise ValueError(f"voice {audio.name}: {exc}") from exc
            log.warning("skipping voice %s: %s", audio.name, exc)
    return voices


def _load_voice(dia: Dia, folder: Path, audio: Path) -> Voice:
    if not _NAME.fullmatch(audio.stem):
        raise ValueError("a voice name has letters, digits, '_', '.' and '-' only, at most 64")
    transcript_file = audio.with_suffix(".txt")
    for path in (audio, transcript_file):
        if path.exists() and path.resolve().parent != folder.resolve():
            raise ValueError(f"{path.name} links to a file outside the voices folder")
    if not transcript_file.is_file():
        raise FileNotFoundError(f"its transcript {transcript_file.name} is missing")
    transcript = transcript_file.read_text(encoding="utf-8").strip()
    if not transcript:
        raise ValueError(f"its transcript {transcript_file.name} is empty")
    codes = dia.encode_audio(str(audio))
    log.info("voice %s: %.1f s of audio", audio.stem, len(codes) / dia.engine.frame_rate)
    return Voice(audio.stem, codes, transcript)
